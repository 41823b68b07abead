"""Shared fixtures. 8 host CPU devices for mesh tests: XLA_FLAGS must be set before jax is imported."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, in this process and in the runs it launches
# (train.compilation_cache_dir defaults to it): the same small programs are compiled once, not per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="poer_jax_test_jit_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

from tests.hf_fixtures import make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_qwen2_dir(tmp_path_factory):
    """Tiny random Qwen2 (untied embeddings, q/k/v bias)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", tied=False, seed=0)


@pytest.fixture(scope="session")
def hf_qwen2_tied_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("qwen2_tied"), "qwen2", tied=True, seed=1)


@pytest.fixture(scope="session")
def hf_qwen3_dir(tmp_path_factory):
    """Tiny random Qwen3 with head_dim (24) != hidden / heads (64 / 4)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", tied=True, seed=2)


@pytest.fixture(scope="session")
def toy_env(tmp_path_factory):
    """Toy task files, tokenizer and a tiny random Qwen2 (1 layer, hidden 32), generated once."""
    from poer_jax.train.config import default_config
    from poer_jax.train.setup import prepare_toy

    work = tmp_path_factory.mktemp("toyenv")
    c = default_config()
    c.workdir = str(work)
    c.toy.enabled = True
    c.toy.num_train = 24
    c.toy.num_test = 8
    c.toy.hidden_size = 32
    c.toy.num_layers = 1
    prepared = prepare_toy(c)
    return {"model": prepared.model.path, "train": prepared.data.train_path, "test": prepared.data.eval_path}


FINISHED_RUN = {"eval.enabled": True, "eval.every": 3, "train.export_final": True, "train.samples_every": 2,
                "train.keep_checkpoints": 3, "optim.learning_rate": 0.01}


@pytest.fixture(scope="session")
def finished_run(toy_env, tmp_path_factory):
    """A finished 3-step POER run from the command line (eval at steps 0 and 3, checkpoints 1-3, export,
    samples at step 2); tests copy its workdir before changing anything. Rewards: accuracy and format,
    plus the number of digits (tests/helpers_rewards.py): groups of an untrained model's answers have a
    spread in it, so the policy moves."""
    from tests.helpers_runs import HELPERS, run_cli

    workdir = tmp_path_factory.mktemp("finished") / "run"
    extra = {**FINISHED_RUN, "reward.functions": f"accuracy,format,{HELPERS}:digit_count"}
    r = run_cli(toy_env, workdir, **extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"workdir": workdir, "stderr": r.stderr, "extra": extra}
