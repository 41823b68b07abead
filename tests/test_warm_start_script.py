"""scripts/warm_start.py makes the demo's committed warm start: a tiny run of it, the directory it writes, and the
checks that keep a run from starting from a warm start made for another task's tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from poer_jax.system.config import ConfigError, config_from_argv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import warm_start  # noqa: E402

TINY = ["--config.toy.num_train=8", "--config.toy.num_test=4", "--config.toy.hidden_size=16",
        "--config.toy.num_layers=1", "--config.toy.min_operands=3", "--config.toy.max_operands=4",
        "--config.warm_start.steps=2", "--config.warm_start.batch_size=4", "--config.warm_start.micro_batches=2",
        "--config.rollout.max_completion_len=64",
        "--config.eval.max_new_tokens=64", "--config.mesh.num_devices=1"]


def test_warm_start_script_writes_a_model_the_demo_can_start_from(tmp_path):
    cfg = config_from_argv([f"--config={ROOT / 'configs' / 'toy.py'}", *TINY])
    out = tmp_path / "ws"
    record = warm_start.make_warm_start(cfg, out, rows=16, validation=3, target=0.0, eval_every=2, eval_k=0)
    assert record["task"] == "chain" and record["steps"] == 2 and record["rows"] == 16
    assert [v["step"] for v in record["validation"]] == [2]
    assert json.loads((out / "warm_start.json").read_text()) == record
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    from poer_jax.system import start

    run = start.prepare_toy(config_from_argv([f"--config={ROOT / 'configs' / 'toy.py'}", *TINY,
                                              f"--config.workdir={tmp_path / 'run'}",
                                              f"--config.warm_start.path={out}"]))
    started = start.use_warm_start(run)
    assert started.model.path == str(out) and started.model.tokenizer_path == str(out)
    other = start.prepare_toy(config_from_argv([f"--config={ROOT / 'configs' / 'toy.py'}", *TINY,
                                                "--config.toy.task=arithmetic", f"--config.workdir={tmp_path / 'o'}",
                                                f"--config.warm_start.path={out}"]))
    with pytest.raises(ConfigError, match="tokenizer .* is not the one of the task"):
        start.use_warm_start(other)  # the arithmetic task has no word tokens: another vocabulary
    with pytest.raises(ConfigError, match="holds no model"):
        start.use_warm_start(config_from_argv([f"--config={ROOT / 'configs' / 'toy.py'}",
                                               f"--config.warm_start.path={tmp_path / 'missing'}"]))


def test_micro_batches_give_the_same_warm_start():
    """Gradient accumulation over row slices is the same update as the whole batch at once."""
    import jax
    import numpy as np

    from poer_jax.model import QwenConfig, init_params
    from poer_jax.rl.supervised import supervised_warm_start

    cfg = QwenConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=8, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 32, rng.integers(2, 6)).astype(np.int32) for _ in range(8)]
    targets = [rng.integers(4, 32, rng.integers(1, 5)).astype(np.int32) for _ in range(8)]
    runs = []
    for k in (1, 4):
        params = init_params(cfg, jax.random.key(0))
        runs.append(supervised_warm_start(params, cfg, prompts, targets, steps=3, learning_rate=1e-2, batch_size=8,
                                          seed=0, pad_id=0, micro_batches=k))
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), runs[0][0], runs[1][0])
    with pytest.raises(ValueError, match="micro_batches=3 must divide"):
        supervised_warm_start(params, cfg, prompts, targets, steps=1, learning_rate=1e-2, batch_size=8, seed=0,
                              pad_id=0, micro_batches=3)


def test_min_lr_ratio_decays_the_warm_start_steps():
    """With a cosine to 0 the last Adam step moves the weights far less than the first; a constant rate does not."""
    import jax
    import numpy as np

    from poer_jax.model import QwenConfig, init_params
    from poer_jax.rl.supervised import supervised_warm_start

    cfg = QwenConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=8, max_position_embeddings=64)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, 32, 4).astype(np.int32) for _ in range(8)]
    targets = [rng.integers(4, 32, 3).astype(np.int32) for _ in range(8)]

    def step_sizes(ratio: float) -> list[float]:
        seen = [jax.tree.map(np.array, init_params(cfg, jax.random.key(0)))]

        def keep(step, params):
            seen.append(jax.tree.map(np.array, params))
            return False

        supervised_warm_start(init_params(cfg, jax.random.key(0)), cfg, prompts, targets, steps=6, learning_rate=1e-3,
                              batch_size=8, seed=0, pad_id=0, min_lr_ratio=ratio, callback=keep, callback_every=1)
        return [float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                                       strict=True))))
                for a, b in zip(seen, seen[1:], strict=False)]

    decayed, constant = step_sizes(0.0), step_sizes(1.0)
    assert decayed[0] == pytest.approx(constant[0], rel=1e-4)  # the cosine starts at the peak
    assert decayed[-1] < 0.2 * decayed[0] and constant[-1] > 0.5 * constant[0], (decayed, constant)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        supervised_warm_start(init_params(cfg, jax.random.key(0)), cfg, prompts, targets, steps=1, learning_rate=1e-3,
                              batch_size=8, seed=0, pad_id=0, min_lr_ratio=1.5)


def test_shared_start_runs_the_supervised_warm_start_once(tmp_path, caplog):
    """``poer_jax.system.prepare_shared_start`` (bench_rollout, sweep_poer) without ``warm_start.path``: it generates
    the task, runs the supervised warm start in the shared directory, and points every run at it with task generation
    and warm start off; a second call finds it there and trains nothing."""
    from poer_jax.system import start

    cfg = config_from_argv([f"--config={ROOT / 'configs' / 'arithmetic.py'}", *TINY, "--config.toy.num_train=16",
                            "--config.data.questions_per_step=4"])
    base = tmp_path / "base"
    first = start.prepare_shared_start(cfg, base)
    assert first.model.path == str(base / "warm_start")
    assert (base / "warm_start" / "config.json").is_file()
    assert len(json.loads((base / "warm_start" / "warm_start_losses.json").read_text())) == 2
    assert not first.toy.enabled and first.warm_start.steps == 0 and first.warm_start.path is None
    assert Path(first.data.train_path).parent == base / "toy"
    assert first.model.tokenizer_path == str(base / "toy" / "model")
    with caplog.at_level("INFO", logger="poer_jax"):
        again = start.prepare_shared_start(cfg, base)
    assert "warm start: reusing" in caplog.text and again.model.path == first.model.path
