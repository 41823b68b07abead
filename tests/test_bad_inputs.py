"""Bad inputs end as exit status 2 with a message naming the config key, the file and the row, before any
heavy work, and leave the workdir as it was. In-process (``poer_jax.train.__main__.main``) on the session's
toy environment: each case stops before the model is compiled, so each takes about a second."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from poer_jax.train.__main__ import main
from tests.helpers_runs import HELPERS, ROOT, argv, snapshot

SENTINEL = "notes.txt"


def _workdir(tmp_path: Path) -> Path:
    """A workdir holding one unrelated file, to check that a refused start changes nothing in it."""
    w = tmp_path / "w"
    w.mkdir()
    (w / SENTINEL).write_text("the user's notes\n")
    return w


def _run(capsys, env: dict, workdir: Path, *extra_argv: str, **extra) -> tuple[int, str]:
    rc = main([*argv(env, workdir, **extra), *extra_argv])
    return rc, capsys.readouterr().err


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _jsonl(path: Path, rows: list[dict]) -> str:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


GOOD = {"problem": "1 + 1", "solution": "1 + 1 = 2. \\boxed{2}", "answer": "2"}


def _data_case(case: str, d: Path) -> tuple[dict, list[str]]:
    """(overrides, strings the message must contain) for a bad data file written into ``d``."""
    f = d / "d.jsonl"
    if case == "missing_file":
        return {"data.train_path": str(d / "nope.jsonl")}, ["'data.train_path'", "nope.jsonl", "does not exist"]
    if case == "missing_eval_file":
        return {"data.eval_path": str(d / "nope.jsonl"), "eval.enabled": True}, ["'data.eval_path'", "nope.jsonl"]
    if case == "malformed_jsonl":
        _write(f, json.dumps(GOOD) + "\n{oops\n")
        return {"data.train_path": str(f)}, ["'data.train_path'", "d.jsonl:2", "malformed JSON"]
    if case == "wrong_problem_column":
        _jsonl(f, [{"question": "1 + 1", "answer": "2"}])
        return {"data.train_path": str(f)}, ["'data.problem_key'", "d.jsonl:1", "missing column 'problem'",
                                             "'question'"]
    if case == "no_gold":
        _jsonl(f, [GOOD, {"problem": "2 + 2"}])
        return {"data.train_path": str(f)}, ["d.jsonl:2", "no gold", "'data.answer_key'", "'data.solution_key'"]
    if case in ("answer_list", "answer_dict", "answer_bool"):
        bad = {"answer_list": ["1"], "answer_dict": {"value": 1}, "answer_bool": True}[case]
        _jsonl(f, [GOOD, GOOD, {"problem": "3 - 1", "answer": bad}])
        kind = type(bad).__name__
        return {"data.train_path": str(f)}, ["d.jsonl:3", "'data.answer_key'", f"got {kind}"]
    if case == "solution_list":
        _jsonl(f, [{"problem": "1 + 1", "solution": ["\\boxed{2}"], "answer": "2"}])
        return {"data.train_path": str(f)}, ["d.jsonl:1", "'data.solution_key'", "got list"]
    if case == "empty":
        _write(f, "")
        return {"data.train_path": str(f)}, ["'data.train_path'", "d.jsonl", "no rows"]
    if case == "unknown_format":
        _write(d / "d.csv", "problem,answer\n1+1,2\n")
        return {"data.train_path": str(d / "d.csv")}, ["'data.train_path'", "d.csv", "unknown data format"]
    if case == "too_long":
        return {"data.max_prompt_len": 10}, ["'data.train_path'", "train.jsonl:1", "longer than max_prompt_len=10"]
    if case == "too_few_rows":
        _jsonl(f, [GOOD, GOOD])
        return {"data.train_path": str(f)}, ["'data.questions_per_step' is 4", "only 2 usable rows"]
    if case == "bad_eval_row":
        _jsonl(f, [GOOD, {"problem": "", "answer": "1"}])
        return {"data.eval_path": str(f), "eval.enabled": True}, ["'data.eval_path'", "d.jsonl:2",
                                                                 "'data.problem_key'", "non-empty string"]
    raise AssertionError(case)


DATA_CASES = ["missing_file", "missing_eval_file", "malformed_jsonl", "wrong_problem_column", "no_gold",
              "answer_list", "answer_dict", "answer_bool", "solution_list", "empty", "unknown_format", "too_long",
              "too_few_rows", "bad_eval_row"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_names_key_file_and_row(toy_env, tmp_path, capsys, case):
    extra, expect = _data_case(case, tmp_path)
    w = _workdir(tmp_path)
    before = snapshot(w)
    rc, err = _run(capsys, toy_env, w, **extra)
    assert rc == 2, err[-2000:]
    for text in expect:
        assert text in err, (text, err[-2000:])
    assert "Traceback" not in err
    assert snapshot(w) == before


def _model_case(case: str, model: Path, d: Path) -> tuple[dict, list[str]]:
    m = d / "m"
    if case == "missing_dir":
        return {"model.path": str(d / "nope")}, ["'model.path'", "nope", "does not exist"]
    if case == "empty_dir":
        m.mkdir()
        return {"model.path": str(m)}, ["'model.path'", "has no config.json"]
    shutil.copytree(model, m)
    if case == "bad_config_json":
        _write(m / "config.json", "{not json")
        return {"model.path": str(m)}, ["'model.path'", "config.json", "cannot read config"]
    if case == "architectures":
        hf = json.loads((m / "config.json").read_text())
        hf["architectures"] = ["LlamaForCausalLM"]
        _write(m / "config.json", json.dumps(hf))
        return {"model.path": str(m)}, ["'model.path'", "config.json", "model_type='qwen2'",
                                        "architectures=['LlamaForCausalLM']"]
    weights = m / "model.safetensors"
    if case == "truncated_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 100])
        return {"model.path": str(m)}, ["'model.path'", "model.safetensors", "truncated"]
    if case == "nan_weight":
        (n,) = struct.unpack("<Q", weights.read_bytes()[:8])
        header = json.loads(weights.read_bytes()[8:8 + n])
        name = "model.layers.0.mlp.down_proj.weight"
        start = 8 + n + header[name]["data_offsets"][0]
        raw = bytearray(weights.read_bytes())
        raw[start + 12: start + 16] = np.float32(np.nan).tobytes()  # the 4th element of that tensor
        weights.write_bytes(bytes(raw))
        return {"model.path": str(m)}, ["non-finite weights", f"'{name}'", "model.safetensors"]
    if case == "missing_tokenizer":
        return {"model.tokenizer_path": str(d / "tok")}, ["'model.tokenizer_path'", "tok", "does not exist"]
    raise AssertionError(case)


MODEL_CASES = ["missing_dir", "empty_dir", "bad_config_json", "architectures", "truncated_weights", "nan_weight",
               "missing_tokenizer"]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_names_key_and_file(toy_env, tmp_path, capsys, case):
    extra, expect = _model_case(case, Path(toy_env["model"]), tmp_path)
    w = _workdir(tmp_path)
    before = snapshot(w)
    rc, err = _run(capsys, toy_env, w, **extra)
    assert rc == 2, err[-2000:]
    for text in expect:
        assert text in err, (text, err[-2000:])
    assert "Traceback" not in err
    assert snapshot(w) == before  # the NaN is found at load: still before the workdir is touched


CONFIG_CASES = [
    ({"rollout.group_size": 1}, ["'rollout.group_size' is 1", "every group-relative advantage"]),
    ({"cache.max_truncation": 30}, ["'cache.max_truncation' (30)", "'rollout.max_completion_len' (24)"]),
    ({"reward.functions": "accuracy,no_such_mod:fn"}, ["'reward.functions'", "no_such_mod", "No module named"]),
    ({"reward.functions": "/nope/rewards.py:fn"}, ["'reward.functions'", "/nope/rewards.py", "no such file"]),
    ({"reward.functions": f"{HELPERS}:no_such_fn"}, ["'reward.functions'", "has no attribute 'no_such_fn'"]),
    ({"reward.functions": "acuracy"}, ["'reward.functions'", "unknown reward 'acuracy'", "did you mean 'accuracy'"]),
    ({"reward.on_error": "ignore"}, ["'reward.on_error' must be one of ['zero', 'raise']"]),
    ({"rollout.group_sise": 4}, ["unknown config key 'rollout.group_sise'", "did you mean 'rollout.group_size'"]),
    ({"max_steps": 4}, ["unknown config key 'max_steps'", "did you mean 'train.max_steps'"]),
    ({"train.max_steps": "many"}, ["'train.max_steps': cannot parse 'many' as int"]),
    ({"cache.init": "file", "cache.init_file": "/nope/answers.jsonl"}, ["'cache.init_file'", "does not exist"]),
]


@pytest.mark.parametrize("extra, expect", CONFIG_CASES, ids=lambda x: ",".join(x) if isinstance(x, dict) else "")
def test_bad_config_names_the_key(toy_env, tmp_path, capsys, extra, expect):
    w = _workdir(tmp_path)
    before = snapshot(w)
    rc, err = _run(capsys, toy_env, w, **extra)
    assert rc == 2, err[-2000:]
    for text in expect:
        assert text in err, (text, err[-2000:])
    assert snapshot(w) == before


@pytest.mark.parametrize("line, expect", [
    ("c.rollout.group_sise = 4", ["bad.py:4", "'rollout.group_sise'", "did you mean 'rollout.group_size'"]),
    ("c.train.max_steps = 'many'", ["bad.py:4", "'train.max_steps'"]),
    ("c.rolout.group_size = 4", ["bad.py:4", "'rolout.group_size'", "did you mean 'rollout.group_size'"]),
])
def test_bad_config_file_names_line_and_key(tmp_path, capsys, line, expect):
    f = tmp_path / "bad.py"
    f.write_text("from poer_jax.system.config import default_config\ndef get_config():\n"
                 f"    c = default_config()\n    {line}\n    return c\n")  # the bad line is line 4
    rc = main([f"--config={f}", f"--config.workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err
    assert rc == 2
    for text in expect:
        assert text in err, (text, err)
    assert not (tmp_path / "w").exists()


def test_toy_run_with_a_missing_data_file_fails_before_generating_the_task(tmp_path, capsys):
    w = tmp_path / "w"
    rc = main([f"--config={ROOT / 'configs' / 'arithmetic.py'}", f"--config.workdir={w}",
               f"--config.data.train_path={tmp_path / 'missing.jsonl'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "'data.train_path'" in err and "missing.jsonl" in err, err
    assert not w.exists()  # no toy task, tokenizer or model generated


def test_help_shows_the_config_files_values_and_every_keys_meaning(capsys):
    from poer_jax.system.config import SCHEMA, keys

    assert main([f"--config={ROOT / 'configs' / 'arithmetic.py'}", "--config.train.max_steps=7", "--help"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("workdir "))
    assert "'runs/arithmetic_poer'" in line and "(default: 'runs/poer')" in line
    assert next(x for x in out.splitlines() if x.strip().startswith("train.max_steps ")).split()[1] == "7"
    assert "Exit status" in out
    for key in keys(SCHEMA):
        assert f"  {key} " in out, key


def test_the_command_line_exits_2_without_a_traceback(tmp_path):
    """One real subprocess: the exit status and the message reach the shell; nothing is created."""
    r = subprocess.run([sys.executable, "-m", "poer_jax.train", f"--config={ROOT / 'configs' / 'arithmetic.py'}",
                        "--config.rollout.group_sise=4", f"--config.workdir={tmp_path / 'w'}"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2, r.stderr
    assert "did you mean 'rollout.group_size'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()
