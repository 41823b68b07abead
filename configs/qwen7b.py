"""DeepSeek-R1-Distill-Qwen-7B with POER, the paper's settings (section 4.1, Table 9).

G 6, temperature 0.7, max length 4096, L 300 (set cache.truncation_fraction=0.5 for the dynamic
0.5 x shortest-response variant), length-aware reward alpha 0.01, m 0.5, M 1, epsilon 0.1, FSDP over 8 devices.
float32 master weights and Adam moments with bfloat16 matmuls, remat, splash / cuDNN attention; training over
fsdp 4 x tensor 2, rollout in 4 data-parallel groups of 2 devices. Fits 8 chips of >= 32 GiB (``scripts/plan.py``,
docs/benchmarks.md and docs/gpu-plan.md: TPU v5p-8, largest peak the prefill, 42.1 of 96.9 GB usable per chip; v6e-8,
the update step, 32.0 of 32.6 GB; 8 x H100-80GB, the prefill, 36.0 of 76.0 GB); not one chip (v5e-1, one H100: the
train state alone is 91 GB); not 16 GiB chips (v5e-8: exit 1). The same settings with LoRA adapters fit a v5e-8:
configs/qwen7b_lora.py (docs/lora.md).

    python -m poer_jax.train --config=configs/qwen7b.py --config.model.path=/models/DeepSeek-R1-Distill-Qwen-7B \
        --config.data.train_path=/data/open-rs/train.parquet
"""

from poer_jax.system.config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/qwen7b_poer"
    c.model.path = "DeepSeek-R1-Distill-Qwen-7B"  # a local HF directory; override on the command line
    c.model.param_dtype = "float32"  # master weights and Adam moments: updates of lr 1e-6 survive
    c.model.dtype = "bfloat16"  # matmuls
    c.model.remat = True
    c.model.attention = "auto"  # splash on TPU, cuDNN flash on GPU
    c.data.train_path = "data/open-rs/train.jsonl"
    c.data.max_prompt_len = 512
    c.data.questions_per_step = 96  # x G 6 = 576 samples, the paper's global batch
    c.rollout.strategy = "poer"
    c.rollout.group_size = 6
    c.rollout.temperature = 0.7
    c.rollout.max_completion_len = 4096
    c.rollout.page_size = 64
    # KV pool: a quarter of the memory the rollout's other buffers leave (train state, reference and sampler
    # weights), capped at what a device's share of a step uses; the rest is for the decode step's temporaries
    # (with mesh.tensor = 2 it runs XLA's attention, which gathers the pages). The update frees the pool.
    c.rollout.kv_cache_fraction = 0.25
    c.rollout.fixed_page_tables = True  # one decode program per row count: each 7B compile takes minutes
    c.cache.init = "sample"
    c.cache.max_truncation = 300
    c.cache.budget = "max_length"
    c.cache.update_mode = "epsilon_greedy"
    c.cache.epsilon = 0.1
    c.reward.functions = ("accuracy", "format")
    c.reward.length_aware = True
    c.reward.alpha = 0.01
    c.reward.r_min = 0.5
    c.reward.r_max = 1.0
    c.loss.beta = 0.04
    c.loss.aggregation = "seq_mean_token_mean"
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 5
    c.optim.micro_batches = 72  # 576 rows -> micro-batches of 8 rows: one per device of the 8
    c.train.max_steps = 48  # ~4 epochs of open-rs 7k at 576 samples / step is 4 x 7000 / 96 = 292; set as needed
    c.train.checkpoint_every = 10
    c.eval.every = 10
    c.eval.max_new_tokens = 4096
    # training shards the state over all 8 devices (fsdp x tensor); the rollout runs 4 data-parallel groups,
    # each holding the bfloat16 weights split over 2 devices (a whole copy per device would take 15 GB)
    c.mesh.data = 1
    c.mesh.fsdp = 4
    c.mesh.tensor = 2
    return c
