"""The training configuration's keys: one :class:`Field` per key (default, type, help text, allowed values,
whether it may change on resume), as a declarative table. ``poer_jax.system.config`` builds the defaults,
validation, overrides and ``--help`` from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Field:
    default: Any
    type: type | tuple[type, ...]
    help: str = ""
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    optional: bool = False  # None allowed
    resume_safe: bool = False  # may change when a run is resumed (else the resume is refused)


def _f(default: Any, typ: Any, help: str = "", **kw: Any) -> Field:
    return Field(default, typ, help, **kw)


NUM = (int, float)
# Below this an Adam step (~lr per weight) is under half of bfloat16's spacing at a typical weight of 0.02
# (2^-6 * 2^-8 = 6.1e-5), so bfloat16 master weights would not move at all.
BF16_MIN_LEARNING_RATE = 1e-4
SCHEMA: dict[str, Any] = {
    "workdir": _f("runs/poer", str, "the run's directory: checkpoints/, metrics.jsonl, samples.jsonl, tb/, export/, "
                  "summary.json", resume_safe=True),
    "seed": _f(0, int, "seeds data order, sampling, truncation and cache updates"),
    "resume": _f(True, bool, "continue the run in workdir when there is one (its config is compared key by key); "
                 "false: refuse to touch a workdir that holds a run", resume_safe=True),
    "overwrite": _f(False, bool, "start over in a workdir that holds a run: its files are moved to "
                    "workdir/previous/<time>/ first (nothing is deleted)", resume_safe=True),
    "model": {
        "path": _f(None, str, "local HF model directory (config.json + safetensors)", optional=True),
        "preset": _f(None, str, "random weights of a real shape (poer_jax.model.preset_names())", optional=True),
        "tokenizer_path": _f(None, str, "tokenizer directory; default: model.path", optional=True),
        "param_dtype": _f("float32", str, "storage dtype of the weights and optimizer state",
                          choices=("float32", "bfloat16")),
        "dtype": _f("float32", str, "matmul dtype", choices=("float32", "bfloat16")),
        "remat": _f(False, bool, "rematerialise each layer in the backward pass (less memory, same numbers)",
                    resume_safe=True),
        "attention": _f("auto", str, "prefill / training attention: auto = splash on TPU, cudnn on GPU, dense on CPU; "
                        "chunked: O(T) memory anywhere", choices=("auto", "dense", "chunked", "cudnn", "splash"),
                        resume_safe=True),
    },
    "data": {
        "train_path": _f(None, str, "training problems: JSONL, Parquet or a saved HF dataset directory", optional=True),
        "eval_path": _f(None, str, "held-out problems for eval.* (same formats); none: no evaluation",
                        optional=True, resume_safe=True),
        "problem_key": _f("problem", str, "column holding the problem text"),
        "solution_key": _f("solution", str, "column holding a worked solution with a \\boxed{} answer (optional)"),
        "answer_key": _f("answer", str, "column holding the final answer (a string or a number)"),
        "system_prompt": _f(None, str, "system prompt; default: the open-rs system prompt; \"\" = none", optional=True),
        "chat_template": _f("auto", str, "auto: the tokenizer's chat template if it has one; always: require it; "
                            "never: the plain 'Problem: ... Answer:' template", choices=("auto", "always", "never")),
        "max_prompt_len": _f(512, int, "longest prompt in tokens (data.on_too_long decides what happens to longer)",
                             min=1),
        "on_too_long": _f("error", str, "a prompt over data.max_prompt_len: error (naming the row) or skip the row",
                          choices=("error", "skip")),
        "questions_per_step": _f(8, int, "questions (groups) per step, over all processes", min=1),
        "limit": _f(None, int, "use only the first N training rows", optional=True, min=1),
        "eval_limit": _f(None, int, "use only the first N held-out rows", optional=True, min=1, resume_safe=True),
    },
    "rollout": {
        "strategy": _f("poer", str, "poer: continue cached prefixes; full: plain GRPO/DAPO", choices=("poer", "full")),
        "group_size": _f(6, int, "G: samples per question; the advantage is relative to the group (Eq. 6)", min=1),
        "temperature": _f(0.7, NUM, "sampling temperature (0: greedy)", min=0.0),
        "top_p": _f(1.0, NUM, "nucleus sampling mass (1: off)", min=0.0, max=1.0),
        "top_k": _f(0, int, "sample among the k most likely tokens; 0 = off", min=0),
        "max_completion_len": _f(4096, int, "longest response in tokens (cached prefix + continuation)", min=1),
        "max_continuation_len": _f(None, int, "POER: at most this many new tokens per continuation, whatever "
                                   "cache.budget allows (a batched decode runs until its longest continuation "
                                   "stops); None = the budget alone (the paper). Full rollouts: "
                                   "rollout.max_completion_len", optional=True, min=1),
        "page_size": _f(16, int, "tokens per KV-cache page of the sampler", min=1, resume_safe=True),
        "kv_cache_gb": _f(16.0, NUM, "KV pool per device in GB (K and V, all layers), capped at what the device's "
                          "share of a step can use at once; samples that do not fit wait for finished ones' pages",
                          min=0.0, resume_safe=True),
        "kv_cache_fraction": _f(None, NUM, "KV pool per device as this fraction of its free memory when the "
                                "sampler is built, less the sampler's weights (backends that report memory: GPU, "
                                "TPU); overrides kv_cache_gb", optional=True, min=0.0, max=1.0, resume_safe=True),
        "num_pages": _f(0, int, "KV pages per device, overriding the budget; 0 = from kv_cache_gb / "
                        "kv_cache_fraction", min=0, resume_safe=True),
        "max_decode_slots": _f(0, int, "cap on the samples a device decodes at once (rounded up to a power of "
                               "two, at least one group); 0 = the device's share of the largest call. Lower: "
                               "smaller decode temporaries, more refill rounds", min=0, resume_safe=True),
        "fixed_page_tables": _f(False, bool, "decode with page tables at the config's maximum width: one decode "
                                "program per row count instead of one per bucket of prompt and budget (few "
                                "compiles for big models; slightly more attention work for short samples)",
                                resume_safe=True),
        "attention_kernel": _f("auto", str, "decode attention: auto (by platform), xla (pure JAX), pallas_gpu "
                               "(Triton), pallas_tpu (Mosaic)", choices=("auto", "xla", "pallas_gpu", "pallas_tpu"),
                               resume_safe=True),
        "layer_loop": _f("auto", str, "how the sampler runs the layers: auto (unrolled on CPU), scan, unrolled "
                         "(the sampler then holds its own per-layer copy of the weights)",
                         choices=("auto", "scan", "unrolled"), resume_safe=True),
        "kv_layout": _f("auto", str, "KV pool layout: auto (fused on TPU, and on GPU with the KV heads split), "
                        "split (K and V pools [L, Hkv, N, page, hd]), fused (one K/V pool, [L, N, Hkv, 2, page, hd] "
                        "for the xla kernel)",
                        choices=("auto", "split", "fused"), resume_safe=True),
        "matmul_kernel": _f("auto", str, "the sampler's weight products: auto (packed_cpu where it applies), xla "
                            "(XLA's dot), packed_cpu (weights packed per update, a C++ kernel built on first use; "
                            "CPU, float32 or bfloat16, no tensor axis)", choices=("auto", "xla", "packed_cpu"),
                            resume_safe=True),
    },
    "cache": {
        "init": _f("sample", str, "how the cache pool starts (Eq. 1): sample: one answer per question from the "
                   "initial policy; solutions: the dataset's solutions; file: cache.init_file",
                   choices=("sample", "solutions", "file")),
        "init_file": _f(None, str, "JSONL of answers from another model (cache.init='file')", optional=True),
        "truncation": _f("fixed", str, "how L of m ~ U{0..L} is set (Eq. 3-4): fixed = cache.max_truncation; "
                         "dynamic = cache.truncation_fraction x the shortest response of the question's last group "
                         "(the paper's main setting with 0.5); both = the smaller",
                         choices=("fixed", "dynamic", "both")),
        "max_truncation": _f(300, int, "L of cache.truncation=fixed (the cap with both): at most this many tokens "
                             "are cut off a cached answer (Eq. 3)", min=0),
        "truncation_fraction": _f(0.5, NUM, "fraction of cache.truncation=dynamic / both (Eq. 4)", min=0.0, max=1.0),
        "truncation_mode": _f("paper", str, "paper: one m ~ U{0..L} per group; authors: m ~ randint(1, L) per batch",
                              choices=("paper", "authors")),
        "budget": _f("max_length", str, "continuation budget: max_length: up to rollout.max_completion_len; "
                     "removed: at most the m removed tokens", choices=("removed", "max_length")),
        "update_mode": _f("epsilon_greedy", str, "cache update (Eq. 9): epsilon_greedy; none: keep the initial "
                          "answers; authors: best with p 0.5, else a random one",
                          choices=("epsilon_greedy", "none", "authors")),
        "epsilon": _f(0.1, NUM, "epsilon of the epsilon-greedy cache update (Eq. 9)", min=0.0, max=1.0),
    },
    "reward": {
        "functions": _f(("accuracy",), (tuple, list), "accuracy | format | cosine | module:function | "
                        "file.py:function (TRL's signature); import paths are checked before the run starts"),
        "weights": _f(None, (tuple, list), "one weight per function; default all 1", optional=True),
        "cosine_max_len": _f(1000, int, "length in tokens at which the cosine reward reaches its end value", min=1),
        "timeout_s": _f(10.0, NUM, "deadline of one (completion, function) call; past it the reward is 0 and "
                        "counted in rewards/<fn>/timeouts", min=0.01, resume_safe=True),
        "step_timeout_s": _f(120.0, NUM, "deadline of all reward calls of a step together; calls not done by "
                             "then get 0 and are counted as timeouts", min=0.01, resume_safe=True),
        "num_workers": _f(2, int, "reward worker processes", min=1, resume_safe=True),
        "on_error": _f("zero", str, "a reward function that raises or returns a bad value (not a number, NaN, "
                       "inf): zero: reward 0, first failure per function logged, failures counted per step "
                       "(rewards/<fn>/errors, NaN and inf in rewards/<fn>/non_finite); raise: stop the run",
                       choices=("zero", "raise"), resume_safe=True),
        "length_aware": _f(True, bool, "length-aware reward shaping (Eq. 10)"),
        "length_variant": _f("paper", str, "Eq. 10 on every response, l_ref = group mean (paper); or on correct "
                             "answers only (correct_only, the authors' code)", choices=("paper", "correct_only")),
        "alpha": _f(0.01, NUM, "alpha of the length-aware reward (Eq. 10)", min=0.0),
        "r_min": _f(0.5, NUM, "m: lower clip of the length-aware reward (Eq. 10)"),
        "r_max": _f(1.0, NUM, "M: upper clip of the length-aware reward (Eq. 10)"),
        "overlong_buffer": _f(0, int, "DAPO overlong shaping buffer in tokens; 0 = off", min=0),
        "overlong_penalty": _f(1.0, NUM, "DAPO overlong penalty at the maximum length", min=0.0),
        "dynamic_sampling": _f(False, bool, "DAPO: drop zero-spread groups and refill"),
        "max_sampling_attempts": _f(10, int, "dynamic sampling: batches sampled per step before giving up", min=1),
        "advantage_scale": _f("group", str, "divide advantages by the group's std (GRPO), the batch's, or none "
                              "(Dr.GRPO)", choices=("group", "batch", "none")),
    },
    "loss": {
        "objective": _f("ppo_clip", str, "clipped surrogate (Eq. 5) or plain policy gradient",
                        choices=("ppo_clip", "vanilla_pg")),
        "epsilon_low": _f(0.2, NUM, "lower clip of the ratio: 1 - epsilon_low", min=0.0),
        "epsilon_high": _f(0.2, NUM, "upper clip of the ratio: 1 + epsilon_high (DAPO clip-higher: 0.28)", min=0.0),
        "dual_clip": _f(None, NUM, "dual-clip constant c for negative advantages; none: off", optional=True, min=1.0),
        "beta": _f(0.0, NUM, "KL weight; 0 loads no reference model", min=0.0),
        "aggregation": _f("seq_mean_token_mean", str, "how token losses are averaged: GRPO (seq_mean_token_mean), "
                          "DAPO (token_mean) or Dr.GRPO (dr_grpo)",
                          choices=("token_mean", "seq_mean_token_mean", "dr_grpo")),
        "prefix_in_loss": _f(False, bool, "train the reused prefix too (the authors' code)"),
        "logprob_chunk": _f(256, int, "sequence chunk for log-probs (never a [B, T, V] array)", min=1,
                            resume_safe=True),
    },
    "lora": {
        "rank": _f(0, int, "LoRA rank r: train low-rank adapters on frozen base weights (held in model.dtype; "
                   "no reference copy for the KL term: the base with the adapters off); 0 = full-weight update",
                   min=0),
        "alpha": _f(16.0, NUM, "LoRA alpha: the adapters' product is scaled by alpha / rank", min=0.0),
        "targets": _f(("q", "k", "v", "o", "gate", "up", "down"), (tuple, list), "the products that get "
                      "adapters: any of q, k, v, o (attention), gate, up, down (MLP)"),
        "dropout": _f(0.0, NUM, "dropout on the adapters' input in the update's forward (not when sampling or in "
                      "the log-prob passes)", min=0.0, max=1.0),
    },
    "optim": {
        "learning_rate": _f(1e-6, NUM, "peak learning rate (AdamW)", min=0.0),
        "warmup_steps": _f(0, int, "linear warmup in updates", min=0),
        "min_lr_ratio": _f(0.1, NUM, "cosine decay to this fraction of the peak at the last step", min=0.0,
                           max=1.0),
        "weight_decay": _f(0.0, NUM, "AdamW weight decay", min=0.0),
        "b1": _f(0.9, NUM, "Adam beta1", min=0.0, max=1.0),
        "b2": _f(0.999, NUM, "Adam beta2", min=0.0, max=1.0),
        "eps": _f(1e-8, NUM, "Adam epsilon", min=0.0),
        "max_grad_norm": _f(1.0, NUM, "clip the global gradient norm; 0 = off", min=0.0),
        "num_iterations": _f(1, int, "mu: updates per rollout", min=1),
        "num_minibatches": _f(1, int, "mini-batches per update iteration", min=1),
        "micro_batches": _f(1, int, "gradient accumulation per mini-batch", min=1, resume_safe=True),
    },
    "train": {
        "max_steps": _f(100, int, "training steps; may be raised when resuming (the learning-rate schedule then "
                        "spans the new length)", min=1, resume_safe=True),
        "checkpoint_every": _f(50, int, "save a checkpoint every N steps (and at the last)", min=1, resume_safe=True),
        "keep_checkpoints": _f(2, int, "checkpoints kept; older ones are deleted once a newer one is on disk",
                               min=1, resume_safe=True),
        "log_every": _f(10, int, "print the progress line every N steps when stderr is not a terminal", min=1,
                        resume_safe=True),
        "samples_every": _f(10, int, "log one group's completions every N steps (console and samples.jsonl); "
                            "0 = off", min=0, resume_safe=True),
        "export_final": _f(True, bool, "write workdir/export as an HF directory at the end", resume_safe=True),
        "compilation_cache_dir": _f(None, str, "JAX persistent compilation cache; default $JAX_COMPILATION_CACHE_DIR, "
                                    "else workdir/jax_cache; '' = off",
                                    optional=True, resume_safe=True),
    },
    "eval": {
        "every": _f(0, int, "evaluate every N steps; 0 = only at the start and the end", min=0, resume_safe=True),
        "num_samples": _f(1, int, "k samples per problem (avg@k)", min=1, resume_safe=True),
        "temperature": _f(0.6, NUM, "evaluation sampling temperature", min=0.0, resume_safe=True),
        "top_p": _f(0.95, NUM, "evaluation nucleus sampling mass", min=0.0, max=1.0, resume_safe=True),
        "max_new_tokens": _f(None, int, "default: rollout.max_completion_len", optional=True, min=1,
                             resume_safe=True),
        "enabled": _f(True, bool, "evaluate on data.eval_path", resume_safe=True),
    },
    "mesh": {
        "data": _f(1, int, "data-parallel axis size (-1: the remaining devices)", min=-1, resume_safe=True),
        "fsdp": _f(-1, int, "FSDP axis size (-1: the remaining devices)", min=-1, resume_safe=True),
        "tensor": _f(1, int, "tensor-parallel axis size (-1: the remaining devices)", min=-1, resume_safe=True),
        "num_devices": _f(0, int, "use the first N devices (0 = all)", min=0, resume_safe=True),
    },
    "warm_start": {
        "steps": _f(0, int, "supervised steps on the reference solutions before RL (toy demo; what "
                    "scripts/warm_start.py runs); 0 = off", min=0),
        "path": _f(None, str, "an HF model directory to start RL from instead of running the warm start "
                   "(regenerate: python scripts/warm_start.py --config=...)", optional=True),
        "learning_rate": _f(3e-3, NUM, "warm start learning rate (Adam)", min=0.0),
        "batch_size": _f(32, int, "warm start examples per step", min=1),
        "min_lr_ratio": _f(1.0, NUM, "cosine decay of the warm start's learning rate to this fraction at "
                           "warm_start.steps; 1 = constant", min=0.0, max=1.0),
        "micro_batches": _f(1, int, "gradient accumulation slices of a warm-start batch (same update, less memory)",
                            min=1),
    },
    "toy": {
        "enabled": _f(False, bool, "generate a built-in task (toy.task), its tokenizer and a tiny model in workdir"),
        "task": _f("arithmetic", str, "arithmetic: short worked sums; chain: many steps of one skill, long answers "
                   "(the demo, configs/toy.py)", choices=("arithmetic", "chain")),
        "num_train": _f(2000, int, "training problems generated", min=1),
        "num_test": _f(200, int, "held-out problems generated", min=1),
        "max_value": _f(9, int, "operands are drawn from 0..max_value (chain: the constant added at each "
                        "step, <= 9)", min=1),
        "min_operands": _f(2, int, "operands per problem (chain: steps, at most 99)", min=2),
        "max_operands": _f(3, int, "operands per problem: min_operands..max_operands", min=2),
        "word_problem_fraction": _f(0.0, NUM, "fraction of problems phrased in words", min=0.0, max=1.0),
        "hidden_size": _f(64, int, "hidden size of the tiny Qwen2", min=8),
        "num_layers": _f(2, int, "layers of the tiny Qwen2", min=1),
    },
}
