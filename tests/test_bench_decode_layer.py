"""scripts/bench_decode_layer.py: the model's decode layer blocks timed outside the sampler, in every form, on a
tiny shape (the numbers are in docs/benchmarks.md; a timing is never asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_decode_layer  # noqa: E402

TINY = ["--hidden", "32", "--ffn", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--layers", "2",
        "--rows", "3", "--steps", "2", "--repeats", "1"]


def test_every_form_runs_and_is_reported(tmp_path, capsys):
    out = tmp_path / "layer.json"
    assert bench_decode_layer.main([*TINY, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["form"] for r in res["results"]] == list(bench_decode_layer.FORMS)
    # seven weight products a layer: q [32, 32], k and v [32, 16], o [32, 32], gate and up [32, 64], down [64, 32]
    assert res["weight_bytes_per_layer"] == 4 * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 64 * 3)
    for r in res["results"]:
        assert r["ms_per_layer_min"] > 0 and r["ms_per_layer_median"] >= r["ms_per_layer_min"]
        assert r["weights_gb_per_s"] == pytest.approx(res["weight_bytes_per_layer"] / r["ms_per_layer_min"] / 1e6)
    text = capsys.readouterr().out
    assert "ms/layer" in text and all(f in text for f in bench_decode_layer.FORMS)


@pytest.mark.parametrize("bad", [["--forms", "model,fused"], ["--heads", "3"], ["--rows", "0"]])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(SystemExit) as e:
        bench_decode_layer.main([*TINY, *bad])
    assert e.value.code == 2
