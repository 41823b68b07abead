"""MetricsWriter (jsonl + TensorBoard, resume truncation), progress line formatting, scripts/plot_metrics.py."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from poer_jax.console import format_duration
from poer_jax.train import metrics as metrics_lib
from poer_jax.train.metrics import MetricsWriter, read_metrics
from poer_jax.train.progress import Progress, format_step_line, tokens_per_second

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(step: int) -> dict[str, float | int]:
    return {"reward/mean": 0.1 * step, "rewards/accuracy/mean": 0.05 * step, "completions/mean_length": 100 + step,
            "tokens/decoded": 1000 * step, "count": step}


def _run(workdir: Path, steps, resume_step=None, tensorboard=False) -> None:
    with MetricsWriter(workdir, resume_step=resume_step, tensorboard=tensorboard) as w:
        for s in steps:
            w.write(s, _row(s))


def test_jsonl_lines_and_nonfinite(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(0, {"a": 1.5, "n": 3, "flag": True, "np": np.float32(0.25), "arr": np.array(2, np.int64)})
        w.write(1, {"nan": math.nan, "inf": float("inf"), "ninf": -np.inf})
        # Flushed per line: readable before close.
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2
        with pytest.raises(ValueError, match="'vec'"):
            w.write(2, {"vec": np.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            w.write(2, {"step": 1})
        with pytest.raises(ValueError, match="step 0 written after step 1"):
            w.write(0, {"a": 1.0})
    raw = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert raw[0] == {"step": 0, "a": 1.5, "n": 3, "flag": 1, "np": 0.25, "arr": 2}
    assert isinstance(raw[0]["n"], int) and isinstance(raw[0]["a"], float)
    assert raw[1] == {"step": 1, "nan": "nan", "inf": "inf", "ninf": "-inf"}  # strict JSON, no bare NaN
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(rows[1]["nan"]) and rows[1]["inf"] == math.inf and rows[1]["ninf"] == -math.inf


def test_resume_truncation_equals_uninterrupted(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, range(10))
    _run(resumed, range(7))  # the first process got to step 6; its last checkpoint was step 4 ...
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "reward/me')  # ... and it was killed in the middle of writing step 7
    _run(resumed, range(5, 10), resume_step=4)
    assert (resumed / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == list(range(10))
    # No checkpoint at all: a fresh start drops everything.
    _run(resumed, range(3), resume_step=None)
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [0, 1, 2]
    assert not [p for p in os.listdir(resumed) if p.endswith(".tmp")]


def test_malformed_lines_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a": \n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: malformed JSON"):
        read_metrics(path)
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: malformed JSON"):
        MetricsWriter(tmp_path, resume_step=5, tensorboard=False)
    path.write_text('{"step": 0}\n{"a": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: missing or non-integer 'step'"):
        read_metrics(path)
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: expected a JSON object"):
        read_metrics(path)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_metrics(tmp_path / "nope.jsonl")


def test_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboardX")
    _run(tmp_path, range(3), tensorboard=True)
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboardX.proto import event_pb2  # the proto tensorboardX itself writes

    tags = _read_scalar_tags(events[0], event_pb2)
    assert {"reward/mean", "tokens/decoded"} <= {tag for tag, _ in tags}
    assert ("reward/mean", 2) in tags


def _read_scalar_tags(path: Path, event_pb2) -> set[tuple[str, int]]:
    """Parse a TFRecord event file (8-byte length, 4-byte crc, payload, 4-byte crc) without TensorFlow."""
    data = path.read_bytes()
    out, pos = set(), 0
    while pos < len(data):
        (length,) = np.frombuffer(data[pos:pos + 8], "<u8")
        payload = data[pos + 12:pos + 12 + int(length)]
        pos += 12 + int(length) + 4
        event = event_pb2.Event.FromString(payload)
        for value in event.summary.value:
            out.add((value.tag, int(event.step)))
    return out


def test_start_up_imports_no_torch(toy_env, tmp_path):
    """A run's tokenizer and TensorBoard writer leave torch unloaded (importing it costs seconds at every start,
    and tensorboardX and transformers' AutoTokenizer would pull it in when installed); torch still imports after."""
    pytest.importorskip("tensorboardX")
    code = (f"import sys\nfrom poer_jax.system.text import load_tokenizer\n"
            f"from poer_jax.train.metrics import MetricsWriter\n"
            f"tok = load_tokenizer({toy_env['model']!r})\n"
            f"with MetricsWriter({str(tmp_path)!r}, tensorboard=True) as w:\n    w.write(0, {{'loss': 1.0}})\n"
            f"assert 'torch' not in sys.modules, 'torch was imported'\n"
            f"import torch\nprint('torch', torch.__version__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch" in r.stdout and list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_a_trainer_that_grades_in_its_workers_never_imports_math_verify():
    """math-verify imports sympy (~0.35 s per process): ``rewards/answers.py`` loads it on the first parse, so the
    trainer's process, whose reward workers grade, never pays for it; the workers' fork server preloads it."""
    code = ("import sys\nimport poer_jax.train.loop\nfrom poer_jax.train.reward_pool import RewardPool\n"
            "with RewardPool(['accuracy'], num_workers=1) as pool:\n"
            "    res = pool.compute(['q', 'q'], ['so \\\\boxed{4}', '\\\\boxed{5}'],"
            " columns={'solution': ['\\\\boxed{4}'] * 2, 'answer': ['4'] * 2})\n"
            "assert list(res['accuracy']) == [1.0, 0.0], res['accuracy']\n"
            "assert 'math_verify' not in sys.modules and 'sympy' not in sys.modules, 'math-verify was imported'\n"
            "from poer_jax.rewards.answers import PRED_EXTRACTION_CONFIG, grade_completion\n"
            "assert PRED_EXTRACTION_CONFIG[0].boxed_match_priority == 0\n"
            "print(grade_completion('\\\\boxed{4}', '\\\\boxed{4}', '4').correct)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "True"


def test_the_test_environment_keeps_ml_dtypes_below_0_7():
    """pyproject.toml's test extra holds ml-dtypes below 0.7: 0.7.0's import registers numpy ufunc promoters one by
    one (0.55 s more for every process that imports JAX, ~90 of them in this suite). When a later ml-dtypes or numpy
    fixes it, measure ``python -c "import ml_dtypes"`` and lift the bound here and there."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("ml_dtypes").split(".")[:2])
    assert (major, minor) < (0, 7), version("ml_dtypes")


def test_tensorboard_missing_warns_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes the import raise ImportError
    monkeypatch.setattr(metrics_lib, "_tb_missing_warned", False)
    with pytest.warns(UserWarning, match="tensorboardX is not installed"):
        _run(tmp_path / "a", range(2), tensorboard=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(tmp_path / "b", range(2), tensorboard=True)
    assert len(read_metrics(tmp_path / "b" / "metrics.jsonl")) == 2


# ------------------------------------------------------------------------------------------------ progress

def test_format_step_line():
    m = {"reward/mean": 0.51234, "rewards/accuracy/mean": 0.48, "completions/mean_length": 312.44,
         "tokens/decoded": 24600.0, "time/step_s": 20.0}
    line = format_step_line(50, 200, m, elapsed_s=100.0)
    assert line == "step 50/200 (25.0%) | reward 0.512 | acc 0.480 | len 312.4 | tok/s 1.23k | 0:01:40 < 0:05:00"
    line = format_step_line(50, 200, {**m, "rollout/decode_steps": 255}, elapsed_s=100.0)
    assert line.endswith("| tok/s 1.23k | dsteps 255 | 0:01:40 < 0:05:00")
    # Resumed at step 40: 10 steps in 100 s -> 10 s/step, 150 left.
    assert format_step_line(50, 200, {}, 100.0, initial_step=40) == "step 50/200 (25.0%) | 0:01:40 < 0:25:00"
    line = format_step_line(0, 10, {"tokens/decoded_per_s": 2.5e6}, 0.0)
    assert line == "step 0/10 (0.0%) | tok/s 2.5M | 0:00:00 < ?"
    assert tokens_per_second({"tokens/decoded": 10.0, "time/step_s": 0.0}) is None
    assert format_step_line(1, 2, {"reward": 0.25}, 1.0) == "step 1/2 (50.0%) | reward 0.250 | 0:00:01 < 0:00:01"
    assert format_duration(90061) == "1d 1:01:01"
    assert format_duration(math.inf) == "?"


def test_progress_plain_mode_every_n():
    stream = io.StringIO()  # not a TTY: plain lines
    with Progress(total_steps=25, initial_step=0, every=10, stream=stream) as p:
        for step in range(1, 26):
            p.update(step, {"reward/mean": step / 25})
    lines = stream.getvalue().splitlines()
    assert [ln.split(" |")[0] for ln in lines] == ["step 10/25 (40.0%)", "step 20/25 (80.0%)", "step 25/25 (100.0%)"]
    assert "reward 1.000" in lines[-1]
    with pytest.raises(ValueError, match="initial_step"):
        Progress(total_steps=5, initial_step=6)


def test_progress_tqdm_mode():
    stream = io.StringIO()
    with Progress(total_steps=4, initial_step=1, stream=stream, use_tqdm=True) as p:
        p.update(2, {"rewards/accuracy/mean": 0.25})
        p.update(4, {"rewards/accuracy/mean": 0.75})
    out = stream.getvalue()
    assert "4/4" in out and "acc=0.750" in out


# -------------------------------------------------------------------------------------------- plot script

def _plot(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "plot_metrics.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_plot_script(tmp_path):
    poer, grpo = tmp_path / "poer", tmp_path / "grpo"
    with MetricsWriter(poer, tensorboard=False) as w:
        for s in range(12):
            row = {"reward" if k == "reward/mean" else k: v for k, v in _row(s).items()}  # the loop's key
            w.write(s, {**row, "tokens/decoded_full_equiv": 5000 * s, "time/step_s": 2.0 + s % 3})
            if s % 4 == 0:
                w.write(s, {"eval/accuracy": 0.3 + 0.01 * s})
        w.write(12, {"reward": math.nan})
    _run(grpo, range(10))  # no time/step_s: absent from the vs-time plots

    proc = _plot(str(poer), "--out", str(tmp_path / "single"))
    assert proc.returncode == 0, proc.stderr
    names = {"reward", "accuracy", "response_length", "decoded_tokens"}
    expected = {f"{n}.png" for n in names} | {f"{n}_vs_time.png" for n in names}
    assert set(os.listdir(tmp_path / "single")) == expected
    assert all(_is_png(tmp_path / "single" / f) for f in expected)

    proc = _plot(str(poer), "--compare", str(grpo), "--smooth", "3")
    assert proc.returncode == 0, proc.stderr
    assert set(os.listdir(poer / "plots")) == expected
    assert all(_is_png(poer / "plots" / f) for f in expected)

    proc = _plot(str(grpo), "--out", str(tmp_path / "g"))
    assert proc.returncode == 0, proc.stderr
    assert set(os.listdir(tmp_path / "g")) == {f"{n}.png" for n in names}


def test_plot_script_errors(tmp_path):
    proc = _plot(str(tmp_path / "missing"))
    assert proc.returncode == 2 and f"{tmp_path / 'missing' / 'metrics.jsonl'}" in proc.stderr
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward/mean": 1}\n{"step": 1, "reward/mean": }\n'
                                            '{"step": 2}\n')
    proc = _plot(str(tmp_path))
    assert proc.returncode == 2
    assert f"{tmp_path / 'metrics.jsonl'}:2: malformed JSON" in proc.stderr
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "other": 1}\n')
    proc = _plot(str(tmp_path))
    assert proc.returncode == 2 and "none of the plotted metrics" in proc.stderr


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_task_progress_plain_lines_at_each_tenth(caplog):
    from poer_jax.console import TaskProgress

    with caplog.at_level("INFO", logger="poer_jax"), TaskProgress("warm start", 50, unit="steps",
                                                                   stream=io.StringIO()) as bar:
        for done in range(1, 51):
            bar.update(done, f"loss {1 / done:.3f}")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[0].startswith("warm start: 5/50 steps (10%) | loss 0.200 |")
    assert lines[-1].startswith("warm start: 50/50 steps (100%)")


def test_log_records_are_not_glued_to_a_live_bar():
    import logging

    from poer_jax.console import TqdmLoggingHandler
    from poer_jax.train.progress import Progress

    stream = _Tty()
    logger = logging.getLogger("poer_jax.test_bar")
    handler = TqdmLoggingHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with Progress(10, stream=stream) as bar:
            bar.update(1, {"reward": 0.5})
            logger.warning("a message while the bar is live")
            bar.update(2, {"reward": 0.5})
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    # the message sits on a line of its own: the bar's carriage-return updates never precede it on its line
    line = next(x for x in text.replace("\r", "\n").split("\n") if "a message while" in x)
    assert line == "a message while the bar is live"


def test_split_finite_keeps_numbers_and_names_the_rest():
    finite, left_out = metrics_lib.split_finite({"a": 1.0, "n": 3, "loss": math.nan, "g": np.float32(np.inf),
                                                 "z": np.array(-np.inf), "ok": np.float32(2.5)})
    assert finite == {"a": 1.0, "n": 3, "ok": np.float32(2.5)} and left_out == ["loss", "g", "z"]


class _CharTokenizer:
    """decode() of a character-level tokenizer: token id = code point."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def _group(prefix: str, continuations: list[str]):
    """A rollout of one POER group (question 3) whose responses share ``prefix``, and its prompts."""
    from types import SimpleNamespace

    from poer_jax.train.rollout import Rollout

    ids = lambda s: np.asarray([ord(c) for c in s], np.int32)  # noqa: E731
    G = len(continuations)
    r = Rollout(indices=np.asarray([3]), group_size=G, prompt_ids=[ids("Q?")], prefix_ids=[ids(prefix)],
                continuation_ids=[ids(c) for c in continuations], sampler_logprobs=[np.zeros(len(c)) for c in
                                                                                    continuations],
                finish_reason=np.ones(G, np.int32), truncation_m=np.asarray([1]), truncation_L=np.asarray([4]),
                prefilled_tokens=0, decoded_tokens=0, seconds=0.0)
    prompts = SimpleNamespace(rows=lambda idx: [{"answer": "7"} for _ in idx], texts={3: "Problem: Q?"})
    texts = [prefix + c for c in continuations]
    return r, texts, prompts


def test_poer_samples_show_the_cached_prefix_once_and_each_continuation():
    from poer_jax.train.report import PREFIX_TAIL_TOKENS, sample_group

    prefix = "First I write down a long shared line of reasoning, then 3 + 4 = "
    r, texts, prompts = _group(prefix, ["7.\n</think>\n\\boxed{7}", "8.\n</think>\n\\boxed{8}", "7, so \\boxed{7}"])
    totals, correct = np.asarray([1.0, 0.0, np.nan]), np.asarray([1.0, 0.0, np.nan])
    record, shown = sample_group(r, 0, texts, totals, prompts, _CharTokenizer(), 5, strategy="poer", correct=correct)
    lines = shown.splitlines()
    assert lines[0] == "sample at step 5: question 3, gold '7'"
    assert lines[1] == f"  cached prefix: {len(prefix)} tokens, ending ...{prefix[-PREFIX_TAIL_TOKENS:]!r}"
    assert lines[2] == "  [ 1.00 right] +21 tokens: 7. \u23ce </think> \u23ce \\boxed{7}"
    assert lines[3] == "  [ 0.00 wrong] +21 tokens: 8. \u23ce </think> \u23ce \\boxed{8}"
    assert lines[4] == "  [  nan   -  ] +15 tokens: 7, so \\boxed{7}"
    assert shown.count("long shared line") == 0  # the prefix is not repeated: its length and tail stand for it
    assert record["prefix"] == {"length": len(prefix), "tail": prefix[-PREFIX_TAIL_TOKENS:], "text": prefix}
    assert record["completions"] == [
        {"continuation": "7.\n</think>\n\\boxed{7}", "length": 21, "reward": 1.0, "correct": True},
        {"continuation": "8.\n</think>\n\\boxed{8}", "length": 21, "reward": 0.0, "correct": False},
        {"continuation": "7, so \\boxed{7}", "length": 15, "reward": None, "correct": None}]
    json.dumps(record, allow_nan=False)  # what samples.jsonl holds
    _, empty = sample_group(*_group("", ["\\boxed{7}"])[:1], 0, ["\\boxed{7}"], np.asarray([1.0]),
                            _group("", ["x"])[2], _CharTokenizer(), 5, strategy="poer", correct=None)
    assert "cached prefix: 0 tokens (an empty cache row" in empty and "[ 1.00   -  ] +9 tokens" in empty


def test_grpo_samples_show_whole_completions_as_before():
    from poer_jax.train.report import sample_group

    r, texts, prompts = _group("", ["so 3 + 4 = \\boxed{7}", "\\boxed{8}"])
    record, shown = sample_group(r, 0, texts, np.asarray([1.0, 0.0]), prompts, _CharTokenizer(), 2)
    assert shown.splitlines() == ["sample at step 2: question 3, gold '7'", "  [ 1.00] so 3 + 4 = \\boxed{7}",
                                  "  [ 0.00] \\boxed{8}"]
    assert record["completions"][0] == {"text": "so 3 + 4 = \\boxed{7}", "reward": 1.0, "length": 20,
                                        "prefix_length": 0, "continuation": "so 3 + 4 = \\boxed{7}"}
    assert "prefix" not in record


# ------------------------------------------------------------------------------------------ critical path

def test_critical_path_metrics_from_known_lengths():
    """``rollout/*`` of a step of two sampler calls (dynamic sampling's second batch): decode steps add up,
    utilisation is the decode-step tokens over the row-steps of both calls, quantiles over every continuation,
    and the host share is what prefill and decode leave of the rollout time."""
    import jax

    from poer_jax.model.sharding import make_mesh
    from poer_jax.system.multihost import ProcessRows
    from poer_jax.train.rollout import Rollout
    from poer_jax.train.step_metrics import add_critical_path, critical_path_info, critical_path_metrics

    def call(lengths: list[int], steps: int, rows: int, prefill_s: float, decode_s: float) -> Rollout:
        n = len(lengths)
        return Rollout(indices=np.arange(n // 2), group_size=2, prompt_ids=[], prefix_ids=[],
                       continuation_ids=[np.zeros(k, np.int32) for k in lengths], sampler_logprobs=[],
                       finish_reason=np.zeros(n), truncation_m=np.zeros(n // 2), truncation_L=np.zeros(n // 2),
                       prefilled_tokens=0, decoded_tokens=sum(lengths), seconds=1.0, decode_steps=steps,
                       decode_row_steps=steps * rows, decode_step_tokens=sum(lengths) - n, prefill_s=prefill_s,
                       decode_s=decode_s)

    info = critical_path_info()
    first = list(range(1, 21))  # 20 samples of 1..20 tokens: 19 decode steps, 20 rows
    add_critical_path(info, call(first, 19, 20, 0.1, 0.5))
    add_critical_path(info, call([3, 3, 3, 40], 39, 4, 0.2, 0.7))
    rows = ProcessRows(make_mesh({"fsdp": 1}, devices=jax.devices()[:1]))
    m = critical_path_metrics(info, rows, rollout_s=2.0)
    lengths = np.asarray(first + [3, 3, 3, 40])
    assert m["rollout/decode_steps"] == 19 + 39
    assert m["rollout/row_utilisation"] == pytest.approx(((210 - 20) + (49 - 4)) / (19 * 20 + 39 * 4))
    assert m["rollout/continuation_max"] == 40
    assert m["rollout/continuation_p50"] == pytest.approx(np.median(lengths))
    assert m["rollout/continuation_p95"] == pytest.approx(np.percentile(lengths, 95))
    assert m["time/prefill_s"] == pytest.approx(0.3) and m["time/decode_s"] == pytest.approx(1.2)
    assert m["time/rollout_host_s"] == pytest.approx(0.5)
