"""The POER / GRPO training loop (paper Algorithm 1).

Each step: rollout (POER continuations of cached prefixes, or full samples) -> rewards -> DAPO overlong
shaping -> length-aware shaping (Eq. 10) -> group-relative advantages (Eq. 6) -> mu update iterations
(Eq. 5) -> cache update (Eq. 9) -> metrics; evaluation every N steps; checkpoints every N steps.

Every random draw of step s derives from fold_in(key(seed), s), and the data position, cache pool,
parameters and optimizer state are checkpointed together, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from poer_jax import poer
from poer_jax.model.sharding import make_mesh
from poer_jax.rl import (
    DynamicSampler,
    LossConfig,
    apply_overlong_penalty,
    build_rollout_batch,
    group_advantages,
)
from poer_jax.rl.optim import OptimConfig
from poer_jax.rl.update import Trainer, TrainState, create_train_state
from poer_jax.sampler import GroupSampler, SamplerConfig, SamplingParams
from poer_jax.train import setup
from poer_jax.train.checkpoint import Checkpointer
from poer_jax.train.data import ColumnMap, EpochIterator, PromptConfig, load_dataset_file, tokenize_prompts
from poer_jax.train.metrics import MetricsWriter
from poer_jax.train.progress import Progress
from poer_jax.train.reward_pool import RewardPool, RewardSpec
from poer_jax.train.rollout import Rollout, responses_array, rollout

log = logging.getLogger("poer_jax")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _reward_specs(cfg: ml_collections.ConfigDict) -> list[RewardSpec]:
    weights = cfg.reward.weights or [1.0] * len(cfg.reward.functions)
    specs = []
    for name, w in zip(cfg.reward.functions, weights, strict=True):
        kwargs = {"max_len": cfg.reward.cosine_max_len} if name == "cosine" else {}
        specs.append(RewardSpec(name, float(w), kwargs))
    return specs


class PoerTrainer:
    """Builds everything from a validated config; ``run()`` trains to ``train.max_steps``."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        if cfg.toy.enabled:
            cfg = setup.prepare_toy(cfg)
        self.workdir = Path(cfg.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        devices = jax.devices()[: cfg.mesh.num_devices] if cfg.mesh.num_devices else None
        try:
            self.mesh = make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}, devices)
        except ValueError as e:
            raise setup.ConfigError(f"config section 'mesh': {e}") from e
        tok_path = cfg.model.tokenizer_path or cfg.model.path
        if tok_path is None:
            raise setup.ConfigError("config key 'model.tokenizer_path' is required with model.preset")
        self.tokenizer = setup.load_tokenizer(tok_path)
        self.eos_ids, self.pad_id = setup.eos_and_pad(self.tokenizer, cfg.model.path)

        columns = ColumnMap(problem=cfg.data.problem_key, solution=cfg.data.solution_key, answer=cfg.data.answer_key)
        pcfg = PromptConfig(chat_template=cfg.data.chat_template, max_prompt_len=cfg.data.max_prompt_len,
                            on_too_long=cfg.data.on_too_long,
                            **({"system_prompt": cfg.data.system_prompt} if cfg.data.system_prompt else {}))
        self.train_data = load_dataset_file(cfg.data.train_path, columns, limit=cfg.data.limit)
        self.prompts = tokenize_prompts(self.tokenizer, self.train_data, pcfg)
        self.eval_prompts = None
        if cfg.data.eval_path and cfg.eval.enabled:
            eval_data = load_dataset_file(cfg.data.eval_path, columns, limit=cfg.data.eval_limit)
            self.eval_prompts = tokenize_prompts(self.tokenizer, eval_data, pcfg)

        self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=cfg.train.keep_checkpoints)
        resuming = cfg.resume and self.checkpointer.latest_step() is not None
        if cfg.warm_start.steps > 0:
            rows = self.prompts.rows(range(len(self.prompts)))
            targets = [_warm_start_target(r, cfg) for r in rows]
            cfg = setup.run_warm_start(cfg, self.tokenizer, list(self.prompts.ids), targets, self.mesh)
        self.cfg = cfg
        params, self.mcfg = setup.load_model(cfg, self.mesh)

        try:
            self.optim_cfg = OptimConfig(
                learning_rate=cfg.optim.learning_rate, warmup_steps=cfg.optim.warmup_steps,
                total_steps=cfg.train.max_steps * cfg.optim.num_iterations * cfg.optim.num_minibatches,
                min_lr_ratio=cfg.optim.min_lr_ratio, weight_decay=cfg.optim.weight_decay, b1=cfg.optim.b1,
                b2=cfg.optim.b2, eps=cfg.optim.eps, max_grad_norm=cfg.optim.max_grad_norm or None)
        except ValueError as e:  # e.g. warmup longer than the run: name the config keys
            raise setup.ConfigError(f"config section 'optim': {e}") from e
        self.loss_cfg = LossConfig(
            objective=cfg.loss.objective, epsilon_low=cfg.loss.epsilon_low, epsilon_high=cfg.loss.epsilon_high,
            dual_clip=cfg.loss.dual_clip, beta=cfg.loss.beta, aggregation=cfg.loss.aggregation,
            max_completion_len=cfg.rollout.max_completion_len)
        self.ref_params = jax.tree.map(jnp.copy, params) if cfg.loss.beta > 0 else None
        # log-probs at the sampling temperature (TRL); greedy rollouts (T = 0) train at T = 1
        self.trainer = Trainer(self.mcfg, self.loss_cfg, self.optim_cfg, mesh=self.mesh,
                               temperature=cfg.rollout.temperature or 1.0,
                               micro_batches=cfg.optim.micro_batches, chunk_size=cfg.loss.logprob_chunk)
        self.state: TrainState = create_train_state(params, self.trainer)

        # -- sampler: sized for the larger of a training step and an evaluation batch
        R = cfg.rollout
        G = R.group_size
        max_seq = cfg.data.max_prompt_len + R.max_completion_len
        pages_per_seq = _cdiv(max_seq, R.page_size) + 1
        q = cfg.data.questions_per_step
        eval_groups = min(64, len(self.eval_prompts)) if self.eval_prompts is not None else 0
        slots = _pow2(max(q * G, eval_groups * cfg.eval.num_samples, 1))
        num_pages = R.num_pages or (slots * pages_per_seq + _pow2(max(q, eval_groups, 1)) * pages_per_seq + 8)
        self.sampling = SamplingParams(temperature=R.temperature, top_k=R.top_k, top_p=R.top_p)
        self.eval_sampling = SamplingParams(temperature=cfg.eval.temperature, top_p=cfg.eval.top_p)
        scfg = SamplerConfig(page_size=R.page_size, num_pages=num_pages, max_slots=slots,
                             max_pages_per_seq=_pow2(pages_per_seq), max_prefill_length=max_seq,
                             eos_ids=self.eos_ids, pad_id=self.pad_id, sampling=self.sampling,
                             kv_dtype=cfg.model.dtype)
        self.sampler = GroupSampler(self.state.params, self.mcfg, scfg, mesh=self.mesh)

        self.rewards = RewardPool(_reward_specs(cfg), num_workers=cfg.reward.num_workers,
                                  timeout_s=cfg.reward.timeout_s, on_error="default")
        self.grader = self.rewards if "accuracy" in self.rewards.names else RewardPool(
            ["accuracy"], num_workers=1, timeout_s=cfg.reward.timeout_s, on_error="default")
        self.iterator = EpochIterator(len(self.prompts), q, seed=cfg.seed, process_index=jax.process_index(),
                                      process_count=jax.process_count())
        self.truncation = poer.TruncationConfig(
            max_completion_len=R.max_completion_len, max_truncation=cfg.cache.max_truncation,
            fraction=cfg.cache.truncation_fraction, mode=cfg.cache.truncation_mode, budget=cfg.cache.budget)
        self.pool = poer.shard_pool(poer.create(len(self.prompts), R.max_completion_len, self.pad_id), self.mesh)
        self.key = jax.random.key(cfg.seed)
        self.step = 0
        if resuming:
            self._restore()
        self.metrics = MetricsWriter(self.workdir, resume_step=self.step if resuming else None)
        if self.step == 0 and R.strategy == "poer":
            self._init_cache()

    # ---- cache pool initialisation (Eq. 1) -------------------------------------------------------------
    def _init_cache(self) -> None:
        c, n = self.cfg.cache, len(self.prompts)
        rows = self.prompts.rows(range(n))
        if c.init == "solutions":
            texts = [r.get("solution") or r.get("answer") or "" for r in rows]
            ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [self.eos_ids[0]] for t in texts]
            self.pool = poer.from_token_lists(ids, self.pool.max_len, self.pad_id, self.eos_ids[0],
                                              sharding=poer.pool_sharding(self.pool, self.mesh))
        elif c.init == "file":
            problems = [r["problem"] for r in rows]
            mapping = poer.load_answers_file(
                c.init_file, lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"],
                num_questions=n, problems=problems)
            self.pool = poer.from_token_lists(mapping, self.pool.max_len, self.pad_id, self.eos_ids[0],
                                              num_questions=n, sharding=poer.pool_sharding(self.pool, self.mesh))
        else:  # one sample per question from the initial policy
            t0 = time.perf_counter()
            chunk = self.cfg.data.questions_per_step * self.cfg.rollout.group_size
            key = jax.random.fold_in(self.key, -1 & 0x7FFFFFFF)
            for start in range(0, n, chunk):
                idx = np.arange(start, min(n, start + chunk))
                out = self.sampler.generate([self.prompts.ids[i].tolist() for i in idx], 1,
                                            self.cfg.rollout.max_completion_len, jax.random.fold_in(key, start))
                self.pool = poer.insert(self.pool, jnp.asarray(idx, jnp.int32), jnp.asarray(out.tokens),
                                        jnp.asarray(out.lengths))
            log.info("cache pool: %d answers sampled in %.1fs", n, time.perf_counter() - t0)

    # ---- checkpoints ------------------------------------------------------------------------------------
    def _restore(self) -> None:
        state, pool_state, extra = self.checkpointer.restore(abstract_state=self.state)
        self.state = state
        self.pool = poer.from_state_dict(pool_state, poer.pool_sharding(self.pool, self.mesh))
        self.iterator.set_state(extra["data"])
        self.step = int(extra["step"])
        self.sampler.update_params(self.state.params)
        log.info("resumed from %s at step %d", self.checkpointer.directory, self.step)

    def _save(self, force: bool = False) -> None:
        extra = {"step": self.step, "data": self.iterator.get_state(), "config": self.cfg.to_dict()}
        self.checkpointer.save(self.step, self.state, poer.to_state_dict(self.pool), extra, force=force)

    # ---- one step ---------------------------------------------------------------------------------------
    def _rewards(self, r: Rollout) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        G = r.group_size
        n = r.num_samples
        rows = self.prompts.rows(r.indices)
        resp = [r.response_ids(i) for i in range(n)]
        texts = [self.tokenizer.decode(x.tolist(), skip_special_tokens=True) for x in resp]
        cols: dict[str, list[Any]] = {k: [row.get(k) for row in rows for _ in range(G)]
                                      for k in ("solution", "answer")}
        prompts = [self.prompts.texts[i] for i in r.indices for _ in range(G)]
        res = self.rewards.compute(prompts, texts, completion_ids=[x.tolist() for x in resp], columns=cols,
                                   completion_lengths=[len(x) for x in resp])
        finite = np.isfinite(res.total)
        raw = np.where(finite, res.total, 0.0).reshape(-1, G)  # an inf / NaN reward counts as 0, and is counted
        correct = (np.nan_to_num(res["accuracy"], nan=0.0) > 0.5).reshape(-1, G) if "accuracy" in res.names else None
        return raw, correct, {**res.metrics(), "rewards/non_finite": float((~finite).sum())}

    def _shape(self, raw: np.ndarray, correct: np.ndarray | None, lengths: np.ndarray) -> np.ndarray:
        rc = self.cfg.reward
        shaped = jnp.asarray(raw, jnp.float32)
        if rc.overlong_buffer > 0:
            shaped = apply_overlong_penalty(shaped, jnp.asarray(lengths), max_len=self.cfg.rollout.max_completion_len,
                                            buffer_len=rc.overlong_buffer, penalty_factor=rc.overlong_penalty)
        if rc.length_aware:
            shaped = poer.length_aware_reward(
                shaped, jnp.asarray(lengths, jnp.float32), alpha=rc.alpha, r_min=rc.r_min, r_max=rc.r_max,
                variant=rc.length_variant, correct=None if correct is None else jnp.asarray(correct))
        return np.asarray(shaped)

    def _sample_groups(self, key: jax.Array) -> tuple[Rollout, np.ndarray, np.ndarray, dict[str, float], dict]:
        """Rollout + rewards; with dynamic sampling, more batches until enough groups have reward spread."""
        cfg = self.cfg
        G = cfg.rollout.group_size
        dyn = DynamicSampler(cfg.data.questions_per_step, G, cfg.reward.max_sampling_attempts) \
            if cfg.reward.dynamic_sampling else None
        info = {"prefilled": 0, "decoded": 0, "full_equiv": 0, "rollout_s": 0.0, "reward_s": 0.0, "attempts": 0}
        cache_updates = []
        while True:
            batch = next(self.iterator)
            idx = np.asarray(batch.indices)
            r, _ = rollout(self.sampler, idx, [self.prompts.ids[i] for i in idx], G,
                           jax.random.fold_in(key, info["attempts"]), strategy=cfg.rollout.strategy,
                           max_completion_len=cfg.rollout.max_completion_len, pool=self.pool,
                           truncation=self.truncation, eos_ids=self.eos_ids)
            info["attempts"] += 1
            info["prefilled"] += r.prefilled_tokens
            info["decoded"] += r.decoded_tokens
            info["full_equiv"] += r.full_equivalent_decoded()
            info["rollout_s"] += r.seconds
            t0 = time.perf_counter()
            raw, correct, rmetrics = self._rewards(r)
            info["reward_s"] += time.perf_counter() - t0
            lengths = r.response_lengths.reshape(-1, G)
            shaped = self._shape(raw, correct, lengths)
            cache_updates.append((r, shaped, raw))
            if dyn is None:
                info["cache_updates"] = cache_updates
                return r, raw, shaped, rmetrics, info
            done = dyn.add({"row": np.arange(len(idx)), "attempt": np.full(len(idx), len(cache_updates) - 1)}, shaped)
            if done:
                kept, kept_shaped = dyn.result()
                r, raw = _select_groups(cache_updates, kept["attempt"], kept["row"], G)
                info["cache_updates"] = cache_updates
                info.update(dyn.metrics())  # "dynamic_sampling/attempts", ".../kept_fraction"
                return r, raw, kept_shaped, rmetrics, info

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        G = cfg.rollout.group_size
        t_step = time.perf_counter()
        key = jax.random.fold_in(self.key, self.step)
        k_roll, k_cache = jax.random.split(key)
        r, raw, shaped, rmetrics, info = self._sample_groups(k_roll)

        adv = np.asarray(group_advantages(jnp.asarray(shaped), scale=cfg.reward.advantage_scale)).reshape(-1)
        rows = np.arange(r.num_samples) // G
        batch = build_rollout_batch(
            [r.prompt_ids[g] for g in rows], [r.prefix_ids[g] for g in rows], r.continuation_ids, adv,
            old_logps=r.sampler_logprobs if cfg.optim.num_iterations == 1 else None, pad_id=self.pad_id,
            prefix_in_loss=cfg.loss.prefix_in_loss, bucket=64)
        t_up = time.perf_counter()
        self.state, umetrics = self.trainer.train_on_rollout(
            self.state, batch, ref_params=self.ref_params, num_iterations=cfg.optim.num_iterations,
            num_minibatches=cfg.optim.num_minibatches)
        self.sampler.update_params(self.state.params)
        jax.block_until_ready(self.state.params)  # one sync per step, so update time is not billed to the rollout
        update_s = time.perf_counter() - t_up

        cache_metrics: dict[str, Any] = {}
        if cfg.rollout.strategy == "poer":
            for j, (ru, sh, _) in enumerate(info["cache_updates"]):
                toks, lens = responses_array(ru, self.pool.max_len, self.pad_id)
                res = _cache_update(self.pool, jnp.asarray(ru.indices, jnp.int32), jnp.asarray(toks), jnp.asarray(lens),
                                    jnp.asarray(sh, jnp.float32), jax.random.fold_in(k_cache, j),
                                    epsilon=float(cfg.cache.epsilon), mode=cfg.cache.update_mode)
                self.pool = res.pool
            cache_metrics = poer.cache_metrics(self.pool, res)
        self.step += 1

        lengths = r.response_lengths
        m: dict[str, Any] = dict(rmetrics)
        m.update({
            "reward": float(raw.mean()),
            "reward_std": float(raw.std(axis=1, ddof=1).mean()) if G > 1 else 0.0,
            "reward_shaped": float(shaped.mean()),
            "frac_reward_zero_std": float((shaped.std(axis=1) == 0).mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float((r.finish_reason == 2).mean()),
            "completions/mean_continuation_length": float(np.mean([len(c) for c in r.continuation_ids])),
            "tokens/prefilled": info["prefilled"],
            "tokens/decoded": info["decoded"],
            "tokens/decoded_full_equiv": info["full_equiv"],
            "truncation/mean_m": float(r.truncation_m.mean()),
            "truncation/mean_L": float(r.truncation_L.mean()),
            "time/rollout_s": info["rollout_s"],
            "time/reward_s": info["reward_s"],
            "time/update_s": update_s,
            "tokens/decoded_per_s": info["decoded"] / max(info["rollout_s"], 1e-9),
        })
        m.update({k: v for k, v in info.items() if k.startswith("dynamic_sampling/")})
        umetrics = {k: float(v) for k, v in jax.device_get(umetrics).items()}
        if umetrics.get("skipped", 0.0) > 0:
            log.warning("step %d: non-finite loss or gradient in %d update(s): skipped, parameters unchanged",
                        self.step, int(umetrics["skipped"]))
        m.update(umetrics)
        m.update({k: float(v) for k, v in jax.device_get(cache_metrics).items()})
        if self.eval_prompts is not None and cfg.eval.every and self.step % cfg.eval.every == 0:
            m.update(self.evaluate())
        m["time/step_s"] = time.perf_counter() - t_step
        return m

    def evaluate(self) -> dict[str, float]:
        from poer_jax.eval.evaluator import evaluate

        ep = self.eval_prompts
        assert ep is not None
        rows = ep.rows(range(len(ep)))
        res = evaluate(self.sampler, self.tokenizer, list(ep.ids), [r.get("solution") for r in rows],
                       [r.get("answer") for r in rows], k=self.cfg.eval.num_samples,
                       max_new_tokens=self.cfg.eval.max_new_tokens or self.cfg.rollout.max_completion_len,
                       sampling=self.eval_sampling, key=jax.random.fold_in(self.key, 1 << 30), grader=self.grader)
        return res.metrics()

    def run(self) -> dict[str, float]:
        cfg = self.cfg
        progress = Progress(cfg.train.max_steps, self.step)
        last: dict[str, float] = {}
        try:
            if self.step == 0 and self.eval_prompts is not None:
                first = self.evaluate()
                log.info("initial held-out accuracy %.3f", first["eval/accuracy"])
                self.metrics.write(0, {f"{k}": v for k, v in first.items()})
            while self.step < cfg.train.max_steps:
                m = self.train_step()
                last_step = self.step == cfg.train.max_steps
                if last_step and self.eval_prompts is not None and "eval/accuracy" not in m:
                    m.update(self.evaluate())
                self.metrics.write(self.step, m)
                progress.update(self.step, m)
                last = m
                if self.step % cfg.train.checkpoint_every == 0 or last_step:
                    self._save(force=last_step)
            self.checkpointer.wait()
            if cfg.train.export_final and jax.process_index() == 0:
                from poer_jax.model import export_hf

                export_hf(self.state.params, self.mcfg, self.workdir / "export",
                          tokenizer_dir=cfg.model.tokenizer_path or cfg.model.path)
        finally:
            progress.close()
            self.metrics.close()
            self.rewards.close()
            if self.grader is not self.rewards:
                self.grader.close()
            self.checkpointer.close()
        return last


def _warm_start_target(row: dict[str, Any], cfg: ml_collections.ConfigDict) -> str:
    if cfg.toy.enabled:
        from poer_jax.tasks.toy import toy_completion

        return toy_completion(row)
    return row.get("solution") or f"\\boxed{{{row.get('answer')}}}"


def _select_groups(parts: list[tuple[Rollout, np.ndarray, np.ndarray]], attempt: np.ndarray, row: np.ndarray,
                   G: int) -> tuple[Rollout, np.ndarray]:
    """Concatenate the kept groups (dynamic sampling) of several rollouts into one Rollout."""
    raws = []
    groups: dict[str, list[Any]] = {k: [] for k in ("indices", "prompt_ids", "prefix_ids", "m", "L")}
    samples: dict[str, list[Any]] = {k: [] for k in ("cont", "lps", "finish")}
    for a, g in zip(attempt, row, strict=True):
        r, _, raw = parts[int(a)]
        raws.append(raw[int(g)])
        groups["indices"].append(r.indices[g])
        groups["prompt_ids"].append(r.prompt_ids[g])
        groups["prefix_ids"].append(r.prefix_ids[g])
        groups["m"].append(r.truncation_m[g])
        groups["L"].append(r.truncation_L[g])
        for i in range(g * G, (g + 1) * G):
            samples["cont"].append(r.continuation_ids[i])
            samples["lps"].append(r.sampler_logprobs[i])
            samples["finish"].append(r.finish_reason[i])
    r0 = parts[0][0]
    out = Rollout(indices=np.asarray(groups["indices"]), group_size=G, prompt_ids=groups["prompt_ids"],
                  prefix_ids=groups["prefix_ids"], continuation_ids=samples["cont"], sampler_logprobs=samples["lps"],
                  finish_reason=np.asarray(samples["finish"]), truncation_m=np.asarray(groups["m"]),
                  truncation_L=np.asarray(groups["L"]), prefilled_tokens=r0.prefilled_tokens,
                  decoded_tokens=r0.decoded_tokens, seconds=r0.seconds)
    return out, np.stack(raws)


_cache_update = jax.jit(poer.update, static_argnames=("mode",))
