"""The assembly layer: from a validated config to the parts of a run, one named function per part.

A run (``poer_jax.train.PoerTrainer``) calls these with real devices and weights; the plan
(``poer_jax.plan``) calls the same ones with a target's devices and abstract arrays
(``jax.ShapeDtypeStruct``), so what the plan judges is what a run allocates. Modules, one idea each::

    config, schema   the config: its key table, defaults, validation, overrides, --help
    runtime          the JAX backend of a process and the persistent compilation cache
    multihost        processes: barriers, this process's rows of a global batch, process-local weights
    mesh             the (data, fsdp, tensor) mesh over a list of devices; the batch layout over it
    model            the model's shapes (abstract) or its weights on the mesh
    data, preflight  dataset files and prompt building; the input checks before any heavy work
    text             tokenizer, EOS / pad ids, the tokenized training and held-out prompts
    update           the update step's configs and jitted Trainer
    sampler          sampling parameters, the SamplerConfig, the GroupSampler
    memory           what a run keeps on every device, and the check before any loading
    cache_pool       POER's truncation rule and the (empty) cache pool, concrete or abstract
    start            the built-in toy task and the warm start, each made once and cached in workdir

Owns: everything between a config and the objects a run or a plan works with. Not the loop, and not the run's
I/O (data order, rewards, checkpoints, metrics, the run directory, reporting: ``poer_jax.train``).
May import: the core packages (``sampler``, ``rl``, ``poer``, ``rewards``), ``model``, ``tasks`` and the leaf
modules (``jsonl``, ``console``, ``program_spec``); never ``train``, ``plan``, ``eval`` or ``evaluate``
(``tests/test_layers.py``).

The names below are imported lazily: ``import poer_jax.system`` (and the config, which reward workers and
``--help`` read) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "config": ["ConfigError", "apply_overrides", "config_from_argv", "default_config", "describe",
               "load_config_file", "parse_argv", "validate"],
    "runtime": ["enable_compilation_cache"],
    "multihost": ["ProcessLocalParams", "ProcessRows", "barrier", "host_copy", "initialize_from_env",
                  "is_main_process"],
    "mesh": ["build_mesh", "check_batch_layout", "mesh_for"],
    "model": ["load_model", "model_shapes"],
    "data": ["OPEN_RS_SYSTEM_PROMPT", "ColumnMap", "DataError", "MathDataset", "PromptConfig", "TokenizedPrompts",
             "count_jsonl_rows", "load_dataset_file", "tokenize_prompts"],
    "preflight": ["check_inputs", "load_data"],
    "text": ["Prompts", "TextSide", "build_prompts", "build_text", "eos_and_pad", "load_tokenizer"],
    "update": ["build_lora_config", "build_loss_config", "build_optim_config", "build_update_trainer"],
    "sampler": ["EVAL_BATCH", "abstract_decode_params", "build_sampler", "eval_problems", "kv_free_bytes",
                "sampler_config", "sampler_config_for", "sampling_params"],
    "memory": ["check_before_work", "check_resident_memory", "resident_estimate", "rollout_and_update_bytes",
               "trainer_and_sampler_config"],
    "cache_pool": ["build_empty_pool", "build_truncation"],
    "start": ["prepare_shared_start", "prepare_toy", "run_warm_start", "use_warm_start", "warm_start_target"],
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"poer_jax.system.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'poer_jax.system' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_MODULES})
