"""scripts/bench_sampler.py on tiny shapes: both engines run on the same weights and prompts, greedy tokens
agree, compile time is reported apart from steady state, and every option (custom shapes, a local HF directory,
bf16, the KV layout, a thread pin) reaches what it runs. Its timings are in docs/benchmarks.md, never asserted."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_sampler  # noqa: E402

SMALL = ["--batch", "4", "--group", "2", "--prompt-len", "12", "--new-tokens", "5", "--repeats", "1", "--page-size",
         "4"]


def test_against_transformers_on_a_custom_shape_with_the_fused_layout_and_one_thread(tmp_path):
    affinity = os.sched_getaffinity(0)
    try:
        res = bench_sampler.main([*SMALL, "--preset", "tiny", "--set", "num_layers=1", "--set", "vocab_size=300",
                                  "--kv-layout", "fused", "--vs-hf", "--threads", "1", "--json",
                                  str(tmp_path / "b.json")])
        assert res["threads"] == 1
    finally:
        os.sched_setaffinity(0, affinity)  # the test process keeps its cores
    assert res["model"]["layers"] == 1 and res["model"]["vocab"] == 300
    assert res["kv_layout"] == "fused" and res["dtype"] == "float32"
    assert res["hf_greedy_tokens_match"] == 1.0
    # each group's prompt prefilled once (2 prompts); the first new token comes with the prefill
    assert res["prefilled_tokens"] == 2 * 12 and res["decoded_tokens"] == 4 * (5 - 1)
    assert res["compiled_programs"] > 0 and res["compile_s"] > 0 and res["first_call_s"] >= res["compile_s"]
    for k in ("decode_tok_s", "hf_decode_tok_s", "decode_speedup_vs_hf", "end_to_end_speedup_vs_hf"):
        assert res[k] > 0, k
    assert json.loads((tmp_path / "b.json").read_text())["decode_tok_s"] == res["decode_tok_s"]


def test_a_local_hf_directory_in_bf16(hf_qwen2_dir):
    res = bench_sampler.main([*SMALL, "--model-dir", str(hf_qwen2_dir), "--dtype", "bfloat16", "--vs-hf"])
    assert res["preset"] == str(hf_qwen2_dir) and res["dtype"] == "bfloat16"
    assert res["kv_layout"] == "split"  # auto on CPU
    assert 0.0 <= res["hf_greedy_tokens_match"] <= 1.0 and res["hf_decode_tok_s"] > 0


@pytest.mark.parametrize("bad", [["--batch", "3"], ["--set", "num_layers"], ["--new-tokens", "0"],
                                 ["--model-dir", "x", "--set", "num_layers=1"]])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(SystemExit) as e:
        bench_sampler.parse_args([*SMALL, *bad])
    assert e.value.code == 2
