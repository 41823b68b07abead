"""The POER / GRPO training loop (paper Algorithm 1).

Each step: rollout (POER continuations of cached prefixes, or full samples) -> rewards -> DAPO overlong
shaping -> length-aware shaping (Eq. 10) -> group-relative advantages (Eq. 6) -> mu update iterations
(Eq. 5) -> cache update (Eq. 9) -> metrics; evaluation every N steps; checkpoints every N steps.

Every random draw of step s derives from fold_in(key(seed), s), and the data position, cache pool,
parameters and optimizer state are checkpointed together, so a resumed run repeats an uninterrupted one.
How a run starts in its workdir (fresh, resumed, already complete or refused) is ``run_dir``'s, the input
checks before any heavy work ``poer_jax.system.preflight``'s, and what the run reports (samples, summary, export)
``report``'s. Everything a run is built from (mesh, model, tokenizer and prompts, update trainer, sampler, cache
pool, toy task, warm start) is assembled by ``poer_jax.system``.
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
from poer_jax.rl import (
    DynamicSampler,
    DynamicSamplingError,
    apply_overlong_penalty,
    build_rollout_batch,
    group_advantages,
)
from poer_jax.rl.batch import LENGTH_MULTIPLE
from poer_jax.rl.update import TrainState, create_train_state, reference_copy
from poer_jax.sampler.pages import cdiv
from poer_jax.system.cache_pool import build_empty_pool, build_truncation
from poer_jax.system.config import ConfigError
from poer_jax.system.memory import check_before_work
from poer_jax.system.mesh import build_mesh
from poer_jax.system.model import load_model
from poer_jax.system.multihost import barrier, host_copy, is_main_process
from poer_jax.system.preflight import check_inputs
from poer_jax.system.runtime import enable_compilation_cache
from poer_jax.system.sampler import build_sampler, sampling_params
from poer_jax.system.start import prepare_toy, run_sources, run_warm_start, use_warm_start, warm_start_target
from poer_jax.system.text import build_prompts, build_text
from poer_jax.system.update import build_update_trainer
from poer_jax.train import report, run_dir
from poer_jax.train.cache_init import initial_cache_pool
from poer_jax.train.checkpoint import BrokenCheckpointError, Checkpointer, pool_from_items, pool_items
from poer_jax.train.held_out import evaluate_held_out
from poer_jax.train.iterator import build_iterator
from poer_jax.train.metrics import METRICS_FILE, MetricsWriter, SamplesWriter, split_finite
from poer_jax.train.progress import Progress
from poer_jax.train.reward_pool import RewardPool, RewardResult
from poer_jax.train.reward_setup import build_rewards
from poer_jax.train.rollout import Rollout, responses_array, rollout, select_groups
from poer_jax.train.step_metrics import add_critical_path, critical_path_info, gather_reward_result, rollout_metrics

log = logging.getLogger("poer_jax")


class PoerTrainer:
    """Builds everything from a validated config (``poer_jax.system``: one named function per part);
    ``run()`` trains to ``train.max_steps``.

    Construction first decides how the run starts in its workdir (``run_dir.inspect``: fresh, resume,
    already complete, or refused) and checks every input (``check_inputs``), before anything heavy is made.
    Whatever fails later closes what was opened (checkpointer, reward workers, writers) before raising.
    """

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.run_config = cfg.to_dict()  # as given (before the toy task / warm start fill in paths): compared on resume
        self.cfg = cfg
        self.workdir = Path(cfg.workdir)
        self.checkpointer: Checkpointer | None = None
        self.metrics: MetricsWriter | None = None
        self.samples: SamplesWriter | None = None
        self.rewards: RewardPool | None = None
        self.grader: RewardPool | None = None
        self._reported_reward_errors: set[str] = set()
        self._last_batch: tuple[Rollout, list[str], np.ndarray, np.ndarray | None] | None = None
        self.start = run_dir.inspect(cfg)  # a refusal raises here, before anything is written
        self.step = self.start.step or 0
        if self.start.mode == "complete":
            return
        try:
            self._build(cfg)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: ml_collections.ConfigDict) -> None:
        check_inputs(cfg)
        if cfg.toy.enabled:
            cfg = prepare_toy(cfg)
        if cfg.warm_start.path:
            cfg = use_warm_start(cfg)
        self.mesh, self.rows = build_mesh(cfg)
        check_before_work(cfg, self.mesh)  # batch layout and resident memory, before any loading
        text = build_text(cfg)
        self.tokenizer, self.eos_ids, self.pad_id = text.tokenizer, text.eos_ids, text.pad_id
        data = build_prompts(cfg, self.tokenizer)
        self.train_data, self.prompts, self.eval_prompts = data.train_rows, data.train, data.eval
        if cfg.warm_start.steps > 0 and not cfg.warm_start.path:
            targets = [warm_start_target(r, cfg) for r in self.prompts.rows(range(len(self.prompts)))]
            cfg = run_warm_start(cfg, self.tokenizer, list(self.prompts.ids), targets, self.mesh)
        params, self.mcfg = load_model(cfg, self.mesh, frozen=cfg.lora.rank > 0)  # NaN weights are refused here
        # the inputs are good: only now is the run's part of the workdir touched (an old run moved aside,
        # the config recorded); toy/ and warm_start/ are caches
        sources = run_sources(self.cfg, cfg)
        for what, source in sources.items():
            log.info("%s: %s", what, source)
        run_dir.prepare(self.cfg, self.start, main_process=is_main_process(), loaded=sources)
        barrier("poer_jax.run_dir")
        enable_compilation_cache(cfg)  # workdir/jax_cache: written only once the inputs are known good
        self.cfg = cfg
        self.checkpointer = Checkpointer(self.workdir / run_dir.CHECKPOINTS, keep=cfg.train.keep_checkpoints,
                                         broken_directory=self.workdir / run_dir.BROKEN)
        resuming = self.start.mode == "resume"

        # -- the update step (Eq. 5-7) and its state
        self.trainer = build_update_trainer(cfg, self.mcfg, self.mesh)
        self.optim_cfg, self.loss_cfg = self.trainer.optim_cfg, self.trainer.loss_cfg
        # the reference policy is only run forward, in the compute dtype: stored there it gives the same log-probs
        # (every weight is cast to it before use) in half the memory of float32 master weights. LoRA: none, the
        # trainer's frozen base is the reference (the adapters off), and the state holds the adapters only
        lora = self.trainer.lora
        self.ref_params = reference_copy(params, self.mcfg.jnp_dtype) if cfg.loss.beta > 0 and not lora else None
        self.state: TrainState = create_train_state(params, self.trainer)

        # -- rollout: the sampler on this process's devices, fed from the trained weights after each update
        self.sampling, self.eval_sampling = sampling_params(cfg)
        num_eval = len(self.eval_prompts) if self.eval_prompts is not None else 0
        self.sampler, self.sampler_params = build_sampler(
            cfg, self.mcfg, self.mesh, self.rows, self.state.params, text, num_eval, base=self.trainer.base_params,
            lora=lora)
        if self.rows.multihost:
            log.info("process %d of %d: samples %d of the %d questions of a step on its %d devices",
                     self.rows.index, self.rows.count, cdiv(cfg.data.questions_per_step, self.rows.count),
                     cfg.data.questions_per_step, self.sampler_params.mesh.size)

        # -- rewards, data order, POER truncation (Eq. 3-4) and the cache pool
        self.rewards, self.grader = build_rewards(cfg)
        self.iterator = build_iterator(cfg, len(self.prompts))
        self.truncation = build_truncation(cfg)
        self.pool = build_empty_pool(len(self.prompts), cfg.rollout.max_completion_len, self.pad_id,
                                            self.mesh)
        self.key = jax.random.key(cfg.seed)
        self.step = 0
        self.last_eval_correct: np.ndarray | None = None  # [problems, k] of the latest evaluate()
        if resuming:
            self._restore()
        if is_main_process():  # one writer per file for the run
            self.metrics = MetricsWriter(self.workdir, resume_step=self.step if resuming else None)
            self.samples = SamplesWriter(self.workdir, resume_step=self.step if resuming else None)
        if self.step == 0 and cfg.rollout.strategy == "poer":
            self.pool = initial_cache_pool(cfg, self.pool, self.prompts, self.tokenizer, self.eos_ids[0], self.pad_id,
                                           self.mesh, sampler=self.sampler, key=self.key, rows=self.rows)

    def close(self) -> None:
        """Close what the run opened (idempotent): writers, reward workers, the checkpointer (after its
        in-flight saves are on disk, so no Orbax thread outlives the run)."""
        for name in ("metrics", "samples", "rewards", "grader", "checkpointer"):  # grader may be rewards: idempotent
            part = getattr(self, name, None)
            if part is not None:
                setattr(self, name, None)
                part.close()

    def __enter__(self) -> PoerTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- cache pool initialisation (Eq. 1) -------------------------------------------------------------
    # ---- checkpoints ------------------------------------------------------------------------------------
    def _newest_extra(self) -> dict[str, Any] | None:
        """The JSON of the newest checkpoint whose JSON reads (a broken newest one is skipped)."""
        assert self.checkpointer is not None
        for step in reversed(self.checkpointer.all_steps()):
            try:
                return self.checkpointer.restore_extra(step)
            except Exception:  # noqa: BLE001 - Orbax raises FileNotFoundError / ValueError / Exception
                continue
        return None

    def _restore(self) -> None:
        """Continue from the newest intact checkpoint (broken newer ones are moved aside with a warning)."""
        assert self.checkpointer is not None
        saved = (self._newest_extra() or {}).get("pool_shape")
        if saved is not None and tuple(saved) != tuple(self.pool.tokens.shape):
            raise ConfigError(
                f"the checkpoint in workdir {self.workdir} holds a cache pool of shape {tuple(saved)} (questions, "
                f"max length), this run needs {tuple(self.pool.tokens.shape)}: the data file changed since the "
                "run started. Use another 'workdir', or --config.overwrite=true to start over")
        try:
            step, state, pool_state, extra = self.checkpointer.restore_latest_intact(
                self.state, pool_items(self.pool), agree=self.rows.all)
        except BrokenCheckpointError as e:
            raise ConfigError(
                f"{e}\nNo checkpoint of workdir {self.workdir} can be restored into this run; its files are left "
                "as they are. Use --config.overwrite=true to move them aside and start over") from e
        refused, _ = run_dir.compare_configs(extra.get("run_config", self.run_config), self.run_config)
        if refused:  # run_config.json said otherwise: the checkpoint's own record wins
            raise ConfigError(f"checkpoint step {step} in {self.checkpointer.directory} was made with "
                                    "another config:\n" + "\n".join(f"  {r}" for r in refused))
        self.state = state
        if pool_state is not None:
            self.pool = pool_from_items(pool_state)
        self.iterator.set_state(extra["data"])
        self.step = int(extra["step"])
        self.sampler.update_params(self.sampler_params(self.state.params))
        log.info("resumed from %s at step %d", self.checkpointer.directory, self.step)

    def _save(self, force: bool = False) -> None:
        assert self.checkpointer is not None
        extra = {"step": self.step, "data": self.iterator.get_state(), "config": self.cfg.to_dict(),
                 "run_config": self.run_config, "pool_shape": list(self.pool.tokens.shape)}
        self.checkpointer.save(self.step, self.state, pool_items(self.pool), extra, force=force)

    # ---- one step ---------------------------------------------------------------------------------------
    def _rewards(self, r: Rollout, deadline_s: float) -> tuple[np.ndarray, np.ndarray | None, RewardResult]:
        G = r.group_size
        n = r.num_samples
        rows = self.prompts.rows(r.indices)
        resp = [r.response_ids(i) for i in range(n)]
        texts = [self.tokenizer.decode(x.tolist(), skip_special_tokens=True) for x in resp]
        cols: dict[str, list[Any]] = {k: [row.get(k) for row in rows for _ in range(G)]
                                      for k in ("solution", "answer")}
        prompts = [self.prompts.texts[i] for i in r.indices for _ in range(G)]
        res = self.rewards.compute(prompts, texts, completion_ids=[x.tolist() for x in resp], columns=cols,
                                   completion_lengths=[len(x) for x in resp], deadline_s=deadline_s)
        self._report_reward_problems(res)
        self._last_batch = (r, texts, res.total, res["accuracy"] if "accuracy" in res.names else None)
        finite = np.isfinite(res.total)
        raw = np.where(finite, res.total, 0.0).reshape(-1, G)  # an inf / NaN reward counts as 0, and is counted
        correct = (np.nan_to_num(res["accuracy"], nan=0.0) > 0.5).reshape(-1, G) if "accuracy" in res.names else None
        return raw, correct, res

    def _report_reward_problems(self, res: RewardResult) -> None:
        """Failing reward functions are loud: the first traceback of each, then a count every step."""
        for name, message in res.first_errors.items():
            if name not in self._reported_reward_errors:
                self._reported_reward_errors.add(name)
                log.error("reward function %r failed; its completions get reward 0 (reward.on_error=zero; 'raise' "
                          "stops the run). First failure, shown once:\n%s", name, message)
        failed = [f"{name} on {n}" for name, n in res.errors.items() if n]
        if failed:
            log.warning("step %d: reward function errors: %s of %d completions", self.step + 1, ", ".join(failed),
                        len(res.total))
        bad = [f"{name} on {n}" for name, n in res.non_finite.items() if n]
        if bad:
            log.warning("step %d: NaN / inf rewards (given 0, counted in rewards/non_finite): %s of %d completions",
                        self.step + 1, ", ".join(bad), len(res.total))
        if res.deadline_cut:
            log.warning("step %d: reward.step_timeout_s=%g s passed: %d reward call(s) not finished got reward 0",
                        self.step + 1, self.cfg.reward.step_timeout_s, res.deadline_cut)

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

    def _sample_groups(self, key: jax.Array) -> tuple[Rollout, np.ndarray, np.ndarray, RewardResult, dict]:
        """Rollout + rewards of this process's questions; with dynamic sampling, more batches until enough
        groups have reward spread."""
        cfg = self.cfg
        G = cfg.rollout.group_size
        dyn: DynamicSampler | None = None
        info: dict[str, Any] = {"prefilled": 0, "decoded": 0, "full_equiv": 0, "rollout_s": 0.0, "reward_s": 0.0,
                                "attempts": 0, **critical_path_info()}
        cache_updates = []
        while True:
            batch = next(self.iterator)
            idx = np.asarray(batch.indices)
            if dyn is None and cfg.reward.dynamic_sampling:  # target: this process's share of the groups
                dyn = DynamicSampler(len(idx), G, cfg.reward.max_sampling_attempts)
            r, _ = rollout(self.sampler, idx, [self.prompts.ids[i] for i in idx], G,
                           jax.random.fold_in(key, info["attempts"]), strategy=cfg.rollout.strategy,
                           max_completion_len=cfg.rollout.max_completion_len, pool=self.pool,
                           truncation=self.truncation, eos_ids=self.eos_ids, rows=self.rows,
                           group_offset=self.rows.index * len(idx))
            info["attempts"] += 1
            info["prefilled"] += r.prefilled_tokens
            info["decoded"] += r.decoded_tokens
            info["full_equiv"] += r.full_equivalent_decoded()
            info["rollout_s"] += r.seconds
            add_critical_path(info, r)
            t0 = time.perf_counter()  # the step's reward deadline is shared by its sampling attempts
            raw, correct, res = self._rewards(r, max(0.01, cfg.reward.step_timeout_s - info["reward_s"]))
            info["reward_s"] += time.perf_counter() - t0
            lengths = r.response_lengths.reshape(-1, G)
            shaped = self._shape(raw, correct, lengths)
            # the cache's "best" response: correct first (raw reward without an accuracy reward), then R
            cache_updates.append((r, shaped, raw, raw if correct is None else correct.astype(np.float32)))
            if dyn is None:
                info["cache_updates"] = cache_updates
                return r, raw, shaped, res, info
            if self._dynamic_done(dyn, len(idx), shaped, len(cache_updates) - 1):
                kept, kept_shaped = dyn.result()
                r, raw = select_groups(cache_updates, kept["attempt"], kept["row"], G)
                info["cache_updates"] = cache_updates
                info.update(dyn.metrics())  # "dynamic_sampling/attempts", ".../kept_fraction"
                return r, raw, kept_shaped, res, info

    def _dynamic_done(self, dyn: DynamicSampler, num_groups: int, shaped: np.ndarray, attempt: int) -> bool:
        """Offer one batch to dynamic sampling. On several processes each batch is a collective (the cache
        pool truncation), so every process samples until all have their groups, and all fail together."""
        error: DynamicSamplingError | None = None
        if not dyn.done:
            try:
                dyn.add({"row": np.arange(num_groups), "attempt": np.full(num_groups, attempt)}, shaped)
            except DynamicSamplingError as e:
                error = e
        if not self.rows.all(error is None):
            raise error or DynamicSamplingError(
                "dynamic sampling: another process reached reward.max_sampling_attempts without enough groups")
        return self.rows.all(dyn.done)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        G = cfg.rollout.group_size
        t_step = time.perf_counter()
        key = jax.random.fold_in(self.key, self.step)
        k_roll, k_cache = jax.random.split(key)
        r, raw, shaped, res, info = self._sample_groups(k_roll)

        adv = np.asarray(group_advantages(jnp.asarray(shaped), scale=cfg.reward.advantage_scale)).reshape(-1)
        rows = np.arange(r.num_samples) // G
        prompts, prefixes = [r.prompt_ids[g] for g in rows], [r.prefix_ids[g] for g in rows]
        width = max(p.size + x.size + c.size for p, x, c in zip(prompts, prefixes, r.continuation_ids, strict=True))
        batch = build_rollout_batch(
            prompts, prefixes, r.continuation_ids, adv,
            old_logps=r.sampler_logprobs if cfg.optim.num_iterations == 1 else None, pad_id=self.pad_id,
            prefix_in_loss=cfg.loss.prefix_in_loss, bucket=LENGTH_MULTIPLE, min_length=self.rows.max(width),
            max_length=cfg.data.max_prompt_len + cfg.rollout.max_completion_len)
        t_up = time.perf_counter()
        self.sampler.release()  # the update's memory: the sampler's copy is rebuilt from the new weights below
        self.state, umetrics = self.trainer.train_on_rollout(
            self.state, batch, ref_params=self.ref_params, num_iterations=cfg.optim.num_iterations,
            num_minibatches=cfg.optim.num_minibatches)
        self.sampler.update_params(self.sampler_params(self.state.params))
        jax.block_until_ready(self.state.params)  # one sync per step, so update time is not billed to the rollout
        update_s = time.perf_counter() - t_up

        cache_metrics: dict[str, Any] = {}
        if cfg.rollout.strategy == "poer":
            put = self.rows.to_global
            replayed = poer.replayed_fraction(self.pool, put(np.asarray(r.indices, np.int32), fill=-1))
            for j, (ru, sh, _, primary) in enumerate(info["cache_updates"]):
                toks, lens = responses_array(ru, self.pool.max_len, self.pad_id)
                res_u = _cache_update(self.pool, put(np.asarray(ru.indices, np.int32), fill=-1),
                                      put(toks, fill=self.pad_id), put(lens), put(np.asarray(sh, np.float32)),
                                      jax.random.fold_in(k_cache, j), epsilon=float(cfg.cache.epsilon),
                                      mode=cfg.cache.update_mode, primary=put(np.asarray(primary, np.float32)))
                self.pool = res_u.pool
            cache_metrics = {**poer.cache_metrics(self.pool, res_u), "cache/replayed_frac": replayed}
        self.step += 1

        m = rollout_metrics(r, raw, shaped, gather_reward_result(res, self.rows), info, self.rows)
        m["time/update_s"] = self.rows.max(update_s)
        # every token of prompt + response goes through the update's forward and backward (POER's prefix too)
        m["tokens/trained"] = int(self.rows.gather(np.asarray([int(batch.attention_mask.sum())], np.int64)).sum())
        umetrics = {k: float(v) for k, v in jax.device_get(umetrics).items()}
        if umetrics.get("skipped", 0.0) > 0:
            log.warning("step %d: non-finite loss or gradient in %d update(s): skipped, parameters unchanged",
                        self.step, int(umetrics["skipped"]))
        m.update(umetrics)
        m.update({k: float(v) for k, v in jax.device_get(cache_metrics).items()})
        if self.eval_prompts is not None and cfg.eval.every and self.step % cfg.eval.every == 0:
            m.update(self.evaluate())
        m["time/step_s"] = self.rows.max(time.perf_counter() - t_step)
        return m

    def evaluate(self) -> dict[str, float]:
        """Held-out avg@k / pass@k (``held_out.evaluate_held_out``); keeps the [problems, k] correctness."""
        metrics, self.last_eval_correct = evaluate_held_out(self)
        return metrics

    def run(self) -> dict[str, float]:
        """Train from the current step to ``train.max_steps``, export, write the summary; closes the run's
        files and workers however it ends. Returns the last step's metrics ({} when already complete)."""
        cfg = self.cfg
        if self.start.mode == "complete":
            report.log_already_complete(self.workdir, self.start.step, self.start.summary, self.cfg.train.max_steps)
            return {}
        t0 = time.monotonic()
        first_step = self.step
        progress = Progress(cfg.train.max_steps, self.step, every=cfg.train.log_every) if is_main_process() else None
        last: dict[str, float] = {}
        try:
            first_correct = None
            if self.step == 0 and self.eval_prompts is not None:
                first = self.evaluate()
                first_correct = self.last_eval_correct
                log.info("initial held-out accuracy %.3f", first["eval/accuracy"])
                self._write_metrics(0, first)
            while self.step < cfg.train.max_steps:
                m = self.train_step()
                last_step = self.step == cfg.train.max_steps
                if last_step and self.eval_prompts is not None and "eval/accuracy" not in m:
                    m.update(self.evaluate())
                self._write_metrics(self.step, m)
                if progress is not None:
                    progress.update(self.step, m)
                if cfg.train.samples_every and self.step % cfg.train.samples_every == 0:
                    self._log_samples()
                last = m
                if self.step % cfg.train.checkpoint_every == 0 or last_step:
                    self._save(force=last_step)
            if first_correct is not None and self.step > 0 and is_main_process():
                from poer_jax.eval.paired import paired_sign_flip_test

                log.info("%s", paired_sign_flip_test(first_correct, self.last_eval_correct).summary())
            assert self.checkpointer is not None
            self.checkpointer.wait()
            export = self._export() if cfg.train.export_final else None
            if progress is not None:
                progress.close()
            if is_main_process():
                self._finish(export, time.monotonic() - t0, self.step - first_step)
        finally:
            if progress is not None:
                progress.close()
            self.close()
        return last

    def _export(self) -> Path | None:
        lora = self.trainer.lora  # its adapters, in PEFT's layout too: gathered by every process (a collective)
        adapters = host_copy(self.state.params) if lora is not None else None
        if not is_main_process():
            return None
        # the sampler holds a whole copy on this process's devices: no collective needed
        return report.export_run(self.workdir / run_dir.EXPORT, jax.device_get(self.sampler.params), self.mcfg,
                                 self.cfg, adapters=adapters, lora=lora)

    def _finish(self, export: Path | None, seconds: float, steps_here: int) -> None:
        """The end-of-run summary: logged, and written to ``summary.json`` (which marks the run finished)."""
        num_eval = len(self.eval_prompts) if self.eval_prompts is not None else None
        summary = report.build_summary(self.workdir, self.cfg, self.step, export, seconds, steps_here, num_eval)
        run_dir.write_summary(self.workdir, summary)
        for line in report.summary_lines(summary, self.workdir):
            log.info("%s", line)

    def _log_samples(self) -> None:
        """One group of the last step's completions: logged (shortened) and written to samples.jsonl."""
        if self._last_batch is None or self.samples is None:
            return
        r, texts, totals, correct = self._last_batch
        record, shown = report.sample_group(r, 0, texts, totals, self.prompts, self.tokenizer, self.step,
                                            strategy=self.cfg.rollout.strategy, correct=correct)
        self.samples.write(self.step, record)
        log.info("%s", shown)

    def _write_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One line of metrics.jsonl, finite values only; a non-finite one is named in a warning instead."""
        if self.metrics is not None:
            finite, left_out = split_finite(metrics)
            if left_out:
                log.warning("step %d: non-finite metrics left out of %s: %s", step, METRICS_FILE, ", ".join(left_out))
            self.metrics.write(step, finite)


_cache_update = jax.jit(poer.update, static_argnames=("mode",))
