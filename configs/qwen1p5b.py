"""DeepSeek-R1-Distill-Qwen-1.5B with POER, the paper's settings, on one accelerator.

Mixed precision as configs/qwen7b.py (float32 master weights and Adam moments, bfloat16 matmuls), micro-batches
of 4 rows. What it fits is measured by ``scripts/plan.py`` (docs/benchmarks.md, "Will it fit?"): see there for
the per-device numbers on one H100-80GB (estimate) and one TPU v5p chip.
"""

from pathlib import Path

from poer_jax.train.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("qwen7b.py"))
    c.workdir = "runs/qwen1p5b_poer"
    c.model.path = "DeepSeek-R1-Distill-Qwen-1.5B"
    c.optim.micro_batches = 144  # 576 rows -> micro-batches of 4 rows
    c.mesh.fsdp = -1
    return c
