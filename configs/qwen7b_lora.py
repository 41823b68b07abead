"""DeepSeek-R1-Distill-Qwen-7B with POER and LoRA: the paper's settings (configs/qwen7b.py) training rank-64 adapters
on every attention and MLP projection instead of the whole model.

The update holds the frozen base once, in bfloat16 (15.2 GB for the 7B, split over the 8 devices), plus the
adapters (161 M parameters at rank 64) and their float32 Adam moments; the KL reference (beta 0.04) is the same base
with the adapters off, so there is no reference copy. The sampler decodes with the adapters merged into its
bfloat16 weights once per update. What it fits: ``scripts/plan.py --config=configs/qwen7b_lora.py
--target=tpu-v5e-8`` (docs/lora.md), where configs/qwen7b.py (float32 master weights, two moments and a
reference copy) does not fit. The export writes the merged model and the adapters in PEFT's layout
(``workdir/export/adapter``).

    python -m poer_jax.train --config=configs/qwen7b_lora.py \
        --config.model.path=/models/DeepSeek-R1-Distill-Qwen-7B --config.data.train_path=/data/open-rs/train.parquet
"""

from pathlib import Path

from poer_jax.system.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("qwen7b.py"))  # the paper's settings (Table 9)
    c.workdir = "runs/qwen7b_poer_lora"
    c.lora.rank = 64
    c.lora.alpha = 128.0  # alpha / r = 2
    c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
    c.lora.dropout = 0.0
    # adapters start at B = 0 and move through a rank-64 product: LoRA's usual tenfold learning rate of the full
    # update's 1e-6 (float32 adapters and moments: model.param_dtype stays float32, the base is held in bfloat16)
    c.optim.learning_rate = 1e-5
    return c
