"""DeepSeek-R1-Distill-Qwen-1.5B with POER, the paper's settings, on one accelerator.

Mixed precision as configs/qwen7b.py (float32 master weights and Adam moments, bfloat16 matmuls), micro-batches
of 4 rows (576 / 144). What it fits, measured by ``scripts/plan.py`` with the KV pool at
``--config.rollout.num_pages=4096`` (pages of 64 tokens, 7.5 GB): one TPU v5p chip (largest peak, the update
step, 61.9 of 102 GB) and one H100-80GB (estimate from the CPU-compiled programs: 55.6 GB, prefill, of 80).
The resident set alone is 32.5 GB (train state 21.3, reference weights 3.6, KV pool 7.5), and the update step adds
~29 GB of temporaries: a 40 or 48 GB device does not fit it. Numbers: docs/benchmarks.md, "Will it fit?".
"""

from pathlib import Path

from poer_jax.train.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("qwen7b.py"))
    c.workdir = "runs/qwen1p5b_poer"
    c.model.path = "DeepSeek-R1-Distill-Qwen-1.5B"
    c.optim.micro_batches = 144  # 576 rows -> micro-batches of 4 rows
    c.mesh.fsdp = -1  # every device (one: one chip)
    c.mesh.tensor = 1
    # one device decodes every group of a step: at most 256 samples at once (the decode step's temporaries
    # grow with the rows), and a KV pool of 15 % of what the rollout leaves, for the prefill's temporaries
    c.rollout.max_decode_slots = 256
    c.rollout.kv_cache_fraction = 0.15
    return c
