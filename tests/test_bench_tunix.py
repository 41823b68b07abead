"""scripts/bench_tunix.py, the peer side of the decode comparison, runs in Tunix's own venv (google-tunix is not a
dependency): here its tokenizer, its timing arithmetic, its arguments and its message without Tunix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_tunix  # noqa: E402


def test_tokenizer_round_trips_exact_ids_and_has_tunixs_interface():
    tok = bench_tunix.IdTokenizer()
    assert tok.encode("5 17 31999") == [5, 17, 31999]
    assert tok.decode([5, 17, 31999]) == "5 17 31999"
    # tunix.generate.tokenizer_adapter accepts a tokenizer with these methods; BOS 0 is falsy (none added) and
    # the EOS id is one no sampled token can equal
    assert all(callable(getattr(tok, m)) for m in ("encode", "decode", "bos_id", "eos_id", "pad_id"))
    assert not tok.bos_id() and tok.eos_id() < 0


def test_decode_rates_exclude_the_prefill_and_first_token():
    r = bench_tunix.decode_rates(batch=8, new_tokens=129, one_s=2.0, full_s=2.0 + 128 * 0.2)
    assert r["decode_step_ms"] == pytest.approx(200.0)
    assert r["decode_tok_s"] == pytest.approx(40.0)
    with pytest.raises(ValueError, match="not positive"):
        bench_tunix.decode_rates(batch=8, new_tokens=128, one_s=3.0, full_s=2.5)


@pytest.mark.parametrize("bad", [["--heads", "3"], ["--new-tokens", "1"], ["--batch", "0"]])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(SystemExit) as e:
        bench_tunix.main(bad)
    assert e.value.code == 2


def test_without_tunix_it_says_where_to_run_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tunix", None)  # as in poer_jax's own venv, whatever is installed here
    with pytest.raises(SystemExit) as e:
        bench_tunix.main(["--layers", "1"])
    assert "google-tunix" in str(e.value.code)


def test_time_and_report_takes_the_best_of_interleaved_calls_and_writes_json(tmp_path, capsys):
    """The peers' shared timing: one warm-up pair, then --repeats (1, N) pairs; the best of each goes into the
    decode rates, the table and the JSON."""
    import argparse
    import json

    times = iter([9.0, 99.0, 2.0, 2.0 + 127 * 0.3, 1.5, 1.5 + 127 * 0.2])  # warm-up pair, then two pairs
    calls = []

    def call(n):
        calls.append(n)
        return next(times)

    a = argparse.Namespace(batch=8, new_tokens=128, repeats=2, json=tmp_path / "r.json")
    res = bench_tunix.time_and_report(call, a, "peer", "a header line")
    assert calls == [1, 128, 1, 128, 1, 128]
    assert res["prefill_s"] == 1.5 and res["total_s"] == pytest.approx(1.5 + 127 * 0.2)
    assert res["decode_step_ms"] == pytest.approx(200.0) and res["first_calls_s"] >= 0
    assert "a header line" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["engine"] == "peer" and saved["results"]["decode_step_ms"] == pytest.approx(200.0)
