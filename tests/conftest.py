"""Shared fixtures. 8 host CPU devices for mesh tests: XLA_FLAGS must be set before jax is imported.

The suite runs on 2 pytest-xdist workers (pyproject.toml: ``-n 2 --dist loadgroup``). Both inherit this
process's environment (device count, one compilation cache); the toy environment and the finished run are
made once per session, by the first worker that needs them (``_once``); tests that share a module-scoped
fixture run on one worker (``pytest_collection_modifyitems``), and the slow ones start first.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tests.helpers_runs import FINISHED_RUN, RUN_XLA_FLAGS  # stdlib only: jax is not imported yet

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, in this process and in the runs it launches
# (train.compilation_cache_dir defaults to it): the same small programs are compiled once, not per test. Every
# program is kept, however quick to compile: a command-line run whose programs are all cached took 15-18 s instead
# of 20 s with a 0.2 s threshold (each process compiles dozens of small eager ops).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="poer_jax_test_jit_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# libtpu (TPU-topology compiles on this CPU host) in two workers, or beside another job, at once
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Most tests compile many small programs and run each a few times: compiling is most of the suite's time, and
# LLVM at -O0 compiles about 1.8x faster (measured: tests/test_sampler.py, test_update.py and test_cache_pool.py,
# 255 -> 141 s on 2 cores). The matmuls run in Eigen either way, so the few compute-heavy tests lose little.
# The tests' subprocesses use the same flag (``RUN_XLA_FLAGS``), so in-process and command-line numbers compare.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" {RUN_XLA_FLAGS}"

import pytest  # noqa: E402

from tests.hf_fixtures import make_hf_checkpoint  # noqa: E402

SHARED = "finished_run"  # the session fixture whose tests run on one worker (it is made there once)
# nodeid -> xdist group, written by the workers' collection and read by the controller's scheduler: pytest 9.2
# ignores xdist's own channel (it appends "@group" to item._nodeid, pytest-dev/pytest-xdist#1386)
GROUPS = os.environ.setdefault("POER_JAX_TEST_GROUPS",
                               os.path.join(tempfile.mkdtemp(prefix="poer_jax_test_groups_"), "groups.json"))


@pytest.hookimpl(tryfirst=True)  # before xdist's hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Group tests for xdist's ``loadgroup``: the tests of a module-scoped fixture (its module) and those of
    the finished run each on one worker; then the groups with a ``slow`` test first, so that they overlap
    with the rest instead of running alone at the end."""

    def group(item) -> str | None:
        defs = getattr(item, "_fixtureinfo", None)
        defs = defs.name2fixturedefs if defs else {}
        if SHARED in defs:
            return SHARED
        if any(d and d[-1].scope == "module" for d in defs.values()):
            return item.module.__name__.rsplit(".", 1)[-1]
        return None

    scope = {}
    for item in items:
        marked = item.get_closest_marker("xdist_group")
        name = marked.args[0] if marked and marked.args else group(item)
        if name and not marked:
            item.add_marker(pytest.mark.xdist_group(name))
        scope[item] = name or item.nodeid
    slow = {scope[i] for i in items if i.get_closest_marker("slow")}
    items.sort(key=lambda i: scope[i] not in slow)  # stable: the order within a group stays
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:  # every worker collects the same tests: the last to finish replaces the file whole
        tmp = f"{GROUPS}.{worker}"
        Path(tmp).write_text(json.dumps({i.nodeid: scope[i] for i in items if scope[i] != i.nodeid}))
        os.replace(tmp, GROUPS)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's ``loadgroup`` scheduler, with the groups of ``pytest_collection_modifyitems`` (``GROUPS``)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class Scheduling(LoadGroupScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # called once the workers have collected
                self.groups = json.loads(Path(GROUPS).read_text()) if os.path.isfile(GROUPS) else {}
            return self.groups.get(nodeid) or super()._split_scope(nodeid)

    return Scheduling(config, log)


def _once(tmp_path_factory, name: str, make):
    """A session fixture's value made once per session: with xdist, by the first worker that asks (under a
    file lock, in the session's shared temporary directory); the others read it. ``make(directory)`` returns
    something JSON can hold."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return make(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            (root / name).mkdir()
            done.write_text(json.dumps(make(root / name)))
    return json.loads(done.read_text())


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

    def make(work):
        from poer_jax.system.config import default_config
        from poer_jax.system.start import prepare_toy

        c = default_config()
        c.workdir = str(work)
        c.toy.enabled = True
        c.toy.num_train = 24
        c.toy.num_test = 8
        c.toy.hidden_size = 32
        c.toy.num_layers = 1
        prepared = prepare_toy(c)
        return {"model": prepared.model.path, "train": prepared.data.train_path, "test": prepared.data.eval_path}

    return _once(tmp_path_factory, "toyenv", make)




@pytest.fixture(scope="session")
def finished_run(toy_env, tmp_path_factory):
    """A finished 3-step POER run from the command line (eval at steps 0 and 3, checkpoints 1-3, export,
    samples at step 2); tests copy its workdir before changing anything. Rewards: accuracy and format,
    plus the number of digits (tests/helpers_rewards.py): groups of an untrained model's answers have a
    spread in it, so the policy moves."""
    from tests.helpers_runs import HELPERS, run_cli

    def make(work):
        extra = {**FINISHED_RUN, "reward.functions": f"accuracy,format,{HELPERS}:digit_count"}
        r = run_cli(toy_env, work / "run", **extra)
        assert r.returncode == 0, r.stderr[-3000:]
        return {"workdir": str(work / "run"), "stderr": r.stderr, "extra": extra}

    made = _once(tmp_path_factory, "finished", make)
    return {**made, "workdir": Path(made["workdir"])}


@pytest.fixture(scope="session")
def learning_runs(tmp_path_factory):
    """tests/learning_run.py's two runs (80 and 60 steps) from the arithmetic config's committed warm start, full
    weights and rank-8 LoRA, in one process of their own (XLA's default optimisation) that grades the start once:
    ``{"before": problems x samples, "after": {"full": ..., "lora": ...}}``."""
    import subprocess
    import sys

    from tests.helpers_runs import ROOT

    def make(work):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        run = subprocess.run([sys.executable, "-m", "tests.learning_run", str(work / "held_out.json")],
                             capture_output=True, text=True, timeout=1500, env=env, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads((work / "held_out.json").read_text())

    return _once(tmp_path_factory, "learning", make)
