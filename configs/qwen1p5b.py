"""DeepSeek-R1-Distill-Qwen-1.5B with POER (paper settings; fits one 80 GB GPU)."""

from pathlib import Path

from poer_jax.train.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("qwen7b.py"))
    c.workdir = "runs/qwen1p5b_poer"
    c.model.path = "DeepSeek-R1-Distill-Qwen-1.5B"
    c.optim.micro_batches = 24
    c.mesh.fsdp = -1
    return c
