"""scripts/check_parity.py: passes on a faithful port, fails (non-zero) when our model differs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import poer_jax.model as model_pkg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import check_parity  # noqa: E402


def test_parity_script_passes_and_writes_json(hf_qwen3_dir, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_parity.py"), str(hf_qwen3_dir),
                        "--json", str(tmp_path / "p.json")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout
    out = json.loads((tmp_path / "p.json").read_text())
    assert out["ok"] and out["max_abs"] < 1e-4 and out["top1"] == 1.0


def test_parity_script_fails_when_our_model_differs(hf_qwen2_dir, monkeypatch, capsys):
    real = model_pkg.load_hf

    def broken(*a, **k):  # a port bug: the final norm scaled
        params, cfg = real(*a, **k)
        params["final_norm"] = params["final_norm"] * 1.5
        return params, cfg

    monkeypatch.setattr(model_pkg, "load_hf", broken)
    assert check_parity.main([str(hf_qwen2_dir)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_parity_script_bf16(hf_qwen2_dir, capsys):
    assert check_parity.main([str(hf_qwen2_dir), "--dtype", "bfloat16"]) == 0
    assert "PASS" in capsys.readouterr().out
