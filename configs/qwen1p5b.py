"""DeepSeek-R1-Distill-Qwen-1.5B with POER, the paper's settings, on one accelerator.

Mixed precision as configs/qwen7b.py (float32 master weights and Adam moments, bfloat16 matmuls), micro-batches
of 4 rows (576 / 144), at most 256 samples decoded at once, a KV pool of 15 % of what the rollout leaves. What it
fits, measured by ``scripts/plan.py`` (docs/gpu-plan.md): one TPU v5p chip (resident 38.8 GB: train state 21.3,
reference and sampler weights 3.6 each, KV pool 10.3; largest peak the update step, 54.3 of 96.9 GB usable) and one
H100-80GB (XLA:GPU's own programs: resident 35.7 GB, largest peak the update step, 47.1 of 76.0 GB). The update step
alone peaks at ~47-54 GB: a 40 or 48 GB device does not fit it.
"""

from pathlib import Path

from poer_jax.system.config import load_config_file


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
