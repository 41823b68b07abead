"""scripts/accelerator_check.py, the first-contact script for a real GPU or TPU, at its --tiny scale on this CPU: each
check's code path gives a result, a check that fails or hangs is reported and the others still run, one line per
check and a JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import accelerator_check  # noqa: E402


def test_a_check_that_hangs_is_reported_and_the_others_still_run(tmp_path: Path, capsys) -> None:
    """Each check is its own process with its own time limit: here the first cannot finish in time."""
    out = tmp_path / "check.json"
    rc = accelerator_check.main(["--tiny", "--checks", "parity,sampler", "--timeout", "parity=0.01",
                                 "--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1 and len(lines) == 2
    assert lines[0].startswith("TIMEOUT parity") and lines[1].startswith("PASS    sampler")
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["scale"] == "tiny"
    assert [c["status"] for c in report["checks"]] == ["TIMEOUT", "PASS"]
    assert report["device"]["platform"] == "cpu"  # from the check that ran; the parent started no backend
    sampler = report["checks"][1]["details"]
    assert sampler["top1_agreement"] == 1.0 and sampler["max_abs_logprob_diff"] <= sampler["tolerance"]
    with pytest.raises(SystemExit):
        accelerator_check.main(["--checks", "parity,speed"])


@pytest.mark.parametrize("name", ["parity", "bench_sampler"])
def test_quick_checks_pass_at_the_tiny_scale(name: str, tmp_path: Path) -> None:
    ok, summary, details = accelerator_check.RUNNERS[name](accelerator_check.TINY, tmp_path)
    assert ok, summary
    assert details, summary


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train", "bench_rollout"])
def test_training_checks_pass_at_the_tiny_scale(name: str, tmp_path: Path) -> None:
    ok, summary, details = accelerator_check.RUNNERS[name](accelerator_check.TINY, tmp_path)
    assert ok, summary
    if name == "train":
        assert details["steps"] == 3 and details["strategy"] == "poer"
    else:
        assert details["poer"]["steps"] == details["grpo"]["steps"] == 3
