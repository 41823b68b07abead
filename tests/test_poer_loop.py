"""The POER training loop wires its parts together as Algorithm 1 says: checked inside ``PoerTrainer.train_step``
on a tiny model, where a one-line slip (caching the continuation alone, advantages from the raw rewards, the
trainer's log-probs at temperature 1, a dynamic L that is not reachable or not followed) changes the result.

One tiny run serves every check: 2 steps over the same 4 questions (so the second step truncates answers the
first one cached), cache initialised from the reference solutions (every prefix is non-empty), dynamic L from
the command line, a reward that is 1 for everything (only the length-aware shaping spreads a group), sampling
temperature 0.6.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poer_jax.system.config import ConfigError, config_from_argv

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers_rewards.py"
TEMPERATURE = 0.6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import poer_jax.train.loop as loop_mod

    work = tmp_path_factory.mktemp("poer_loop")
    argv = [f"--config={ROOT / 'configs' / 'arithmetic.py'}", "--config.toy.task=arithmetic",
            "--config.toy.min_operands=2",
            "--config.toy.max_operands=3", f"--config.workdir={work}",
            "--config.toy.num_train=4", "--config.toy.num_test=2", "--config.toy.hidden_size=32",
            "--config.toy.num_layers=1", "--config.warm_start.steps=0", "--config.warm_start.path=None",
            "--config.data.questions_per_step=4", "--config.rollout.group_size=4",
            "--config.rollout.max_completion_len=48", f"--config.rollout.temperature={TEMPERATURE}",
            "--config.cache.init=solutions", "--config.cache.truncation=dynamic", "--config.cache.epsilon=0.5",
            f"--config.reward.functions={HELPERS}:constant_one", "--config.reward.length_aware=true",
            "--config.reward.length_variant=paper", "--config.reward.alpha=0.2", "--config.optim.num_iterations=1",
            "--config.optim.micro_batches=1",
            "--config.train.max_steps=2", "--config.eval.enabled=false", "--config.train.export_final=false",
            "--config.mesh.num_devices=1"]
    cfg = config_from_argv(argv)
    trainer = loop_mod.PoerTrainer(cfg)
    seen: dict[str, list] = {"rollouts": [], "shaped": [], "raw": [], "advantages": [], "pools": [], "metrics": []}
    real_rollout, real_shape = loop_mod.rollout, trainer._shape
    real_update = trainer.trainer.train_on_rollout

    def rollout(*a, **kw):
        r, out = real_rollout(*a, **kw)
        seen["rollouts"].append(r)
        return r, out

    def shape(raw, correct, lengths):
        shaped = real_shape(raw, correct, lengths)
        seen["raw"].append(raw)
        seen["shaped"].append(shaped)
        return shaped

    def train_on_rollout(state, batch, **kw):
        seen["advantages"].append(np.asarray(batch.advantages))
        return real_update(state, batch, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(loop_mod, "rollout", rollout)
    trainer._shape = shape
    trainer.trainer.train_on_rollout = train_on_rollout
    try:
        for _ in range(cfg.train.max_steps):
            seen["pools"].append(jax.device_get(trainer.pool))
            seen["metrics"].append(trainer.train_step())
        seen["pools"].append(jax.device_get(trainer.pool))
    finally:
        mp.undo()
        trainer.rewards.close()
        trainer.checkpointer.close()
        trainer.metrics.close()
    seen["trainer"] = trainer
    return seen


def test_solutions_enter_the_cache_as_the_warm_start_writes_them(run):
    """cache.init=solutions caches each question's reference answer in the built-in task's R1 format (the warm
    start's target, ``</think>`` and all), so that every cut falls inside text the policy could have written."""
    from poer_jax.tasks import task_completion

    trainer, pool = run["trainer"], run["pools"][0]
    for q, row in enumerate(trainer.prompts.rows(range(len(trainer.prompts)))):
        ids = np.asarray(pool.tokens[q, : int(pool.lengths[q])]).tolist()
        assert ids[-1] == trainer.eos_ids[0]
        assert trainer.tokenizer.decode(ids[:-1]) == task_completion("arithmetic", row)
        assert "</think>" in task_completion("arithmetic", row)


def test_cache_receives_prefix_plus_continuation(run):
    """Eq. 3 / 9: the cached answer is o = a^[0:-m] || continuation, never the continuation alone."""
    for step, r in enumerate(run["rollouts"]):
        after = run["pools"][step + 1]
        assert all(p.size > 0 for p in r.prefix_ids)  # solutions-initialised: every group continues a prefix
        for g, row in enumerate(r.indices):
            cached = np.asarray(after.tokens[row, : after.lengths[row]])
            responses = [r.response_ids(g * r.group_size + i) for i in range(r.group_size)]
            assert any(np.array_equal(cached, o) for o in responses), (step, g)
            assert np.array_equal(cached[: r.prefix_ids[g].size], r.prefix_ids[g])


def test_returning_questions_continue_their_updated_answers(run):
    """Eq. 9's replacements feed later rollouts: the second step continues answers the first step cached, and
    ``cache/replayed_frac`` says so (0 when every cached answer is still the initial one)."""
    first, second = run["rollouts"]
    assert set(second.indices) == set(first.indices)
    before_second = run["pools"][1]
    for g, row in enumerate(second.indices):
        cached = np.asarray(before_second.tokens[row, : before_second.lengths[row]])
        assert np.isfinite(before_second.last_reward[row])  # written by step 1's update, not the solution
        assert np.array_equal(cached[: second.prefix_ids[g].size], second.prefix_ids[g])
    assert run["metrics"][0]["cache/replayed_frac"] == 0.0 and run["metrics"][1]["cache/replayed_frac"] == 1.0


def test_shaped_rewards_reach_the_advantages(run):
    """Eq. 6 on R (Eq. 10), not on r: with r = 1 everywhere only the length shaping can give advantages."""
    from poer_jax.rl import group_advantages

    for raw, shaped, adv in zip(run["raw"], run["shaped"], run["advantages"], strict=True):
        assert np.all(raw == 1.0)
        assert not np.allclose(shaped, raw)
        expected = np.asarray(group_advantages(jnp.asarray(shaped))).reshape(-1)
        np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
        assert np.abs(adv).max() > 0.1  # raw rewards would give all zeros


def test_trainer_logprobs_use_the_sampling_temperature(run):
    """The update's log pi(o_t | .) is at the rollout temperature: it matches the sampler's own log-probs, and
    the same tokens at temperature 1 would not."""
    from poer_jax.rl.logprobs import token_logprobs

    for m in run["metrics"]:
        assert m["logp_diff/sampler_vs_trainer"] < 2e-4, m["logp_diff/sampler_vs_trainer"]
    trainer, r = run["trainer"], run["rollouts"][-1]
    seq = np.concatenate([r.prompt_ids[0], r.prefix_ids[0], r.continuation_ids[0]])[None].astype(np.int32)
    n = r.continuation_ids[0].size
    lp1, _ = token_logprobs(jax.device_get(trainer.state.params), trainer.mcfg, jnp.asarray(seq),
                            jnp.ones(seq.shape, bool), temperature=1.0)
    gap = np.abs(np.asarray(lp1)[0, -n:] - r.sampler_logprobs[0]).mean()
    assert gap > 1e-2, gap  # the check above would see a temperature-1 trainer


def test_dynamic_truncation_from_the_command_line_follows_the_shortest_response(run):
    """--config.cache.truncation=dynamic: L = floor(0.5 x shortest response of the question's last group)."""
    for step, r in enumerate(run["rollouts"]):
        before = run["pools"][step]
        np.testing.assert_array_equal(r.truncation_L, np.asarray(before.shortest_len)[r.indices] // 2)
        assert np.all(r.truncation_m <= r.truncation_L)
    # the second step's l is the shortest response of the first step's group, not the cached answer's length
    first, second = run["rollouts"]
    lengths = first.response_lengths.reshape(-1, first.group_size)
    shortest = dict(zip(first.indices.tolist(), lengths.min(1).tolist(), strict=True))
    np.testing.assert_array_equal(second.truncation_L, [shortest[int(k)] // 2 for k in second.indices])


def test_a_sampled_cache_pool_is_the_same_in_any_chunks_of_one_shape(run):
    """``cache.init=sample`` (train/cache_init.py): question q's answer is drawn from fold_in(key', q), so the
    pool is the same in whatever ``questions_per_step x group_size`` chunks it is sampled; the chunks are of
    equal size, so every sampler call of a pool has one batch shape (4 questions in chunks of at most 3: 2 + 2,
    where 3 + 1 would compile a second decode program)."""
    import ml_collections

    from poer_jax.system.cache_pool import build_empty_pool
    from poer_jax.train.cache_init import initial_cache_pool

    trainer = run["trainer"]
    sampler = trainer.sampler
    pools, calls = {}, {}
    for chunk in (4, 3, 1):  # questions_per_step x group_size
        cfg = ml_collections.ConfigDict(trainer.cfg.to_dict())  # the run's, sampled in other chunks
        cfg.cache.init, cfg.data.questions_per_step, cfg.rollout.group_size = "sample", chunk, 1
        with _call_shapes(sampler) as calls[chunk]:
            empty = build_empty_pool(len(trainer.prompts), trainer.pool.max_len, trainer.pad_id, trainer.mesh)
            pools[chunk] = jax.device_get(initial_cache_pool(
                cfg, empty, trainer.prompts, trainer.tokenizer, trainer.eos_ids[0], trainer.pad_id, trainer.mesh,
                sampler=sampler, key=jax.random.key(7), rows=trainer.rows))
    assert [len(calls[c]) for c in (4, 3, 1)] == [1, 2, 4]
    assert len(set(calls[3])) == 1 and len(set(calls[1])) == 1, calls
    assert (pools[4].lengths > 0).all()
    for chunk in (3, 1):
        np.testing.assert_array_equal(pools[chunk].tokens, pools[4].tokens)
        np.testing.assert_array_equal(pools[chunk].lengths, pools[4].lengths)


def test_evaluation_batches_are_of_one_shape_and_change_no_sample(run):
    """``evaluate`` splits the problems into equal batches (4 problems at a batch size of 3: 2 + 2, where 3 + 1
    would compile a second decode program); problem j's samples come from fold_in(key, j) in any split."""
    from poer_jax.eval.evaluator import evaluate

    trainer = run["trainer"]
    rows = trainer.prompts.rows(range(len(trainer.prompts)))
    results, calls = {}, {}
    for size in (4, 3):
        with _call_shapes(trainer.sampler) as calls[size]:
            results[size] = evaluate(trainer.sampler, trainer.tokenizer, list(trainer.prompts.ids),
                                     [r.get("solution") for r in rows], [r.get("answer") for r in rows], k=2,
                                     max_new_tokens=16, sampling=trainer.eval_sampling, key=jax.random.key(3),
                                     grader=_AllRight(), batch_size=size)
    assert len(calls[4]) == 1 and len(calls[3]) == 2 and len(set(calls[3])) == 1, calls
    assert results[3].completions == results[4].completions
    np.testing.assert_array_equal(results[3].lengths, results[4].lengths)


@contextlib.contextmanager
def _call_shapes(sampler):
    """The (decode rows, output groups) of each ``sampler.generate`` call made inside the block."""
    real, seen = sampler.generate, []

    def generate(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((sampler.last_plan.shapes.rows, sampler.last_plan.shapes.out_groups))
        return out

    sampler.generate = generate
    try:
        yield seen
    finally:
        del sampler.generate


class _AllRight:
    """A grader that calls every completion right (the test is about sampling, not grading)."""

    def compute(self, prompts, completions, *, columns=None):
        return {"accuracy": np.ones(len(completions))}


def test_truncation_keys_are_validated():
    base = [f"--config={ROOT / 'configs' / 'arithmetic.py'}"]
    with pytest.raises(ConfigError, match="'cache.truncation' must be one of"):
        config_from_argv([*base, "--config.cache.truncation=shortest"])
    with pytest.raises(ConfigError, match="'cache.truncation' must be 'fixed' with cache.truncation_mode='authors'"):
        config_from_argv([*base, "--config.cache.truncation=dynamic", "--config.cache.truncation_mode=authors"])
    with pytest.raises(ConfigError, match="'cache.max_truncation' must be >= 2"):
        config_from_argv([*base, "--config.cache.max_truncation=1", "--config.cache.truncation_mode=authors"])
    from poer_jax.system.cache_pool import build_truncation

    both = build_truncation(config_from_argv([*base, "--config.cache.truncation=both",
                                              "--config.cache.truncation_fraction=0.25"]))
    assert (both.limit, both.fraction, both.max_truncation) == ("both", 0.25, 48)
