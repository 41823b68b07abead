"""The training configuration: one schema, the defaults it implies, validation and command-line overrides.

Config files are Python files with ``get_config() -> ml_collections.ConfigDict`` that start from
``default_config()`` (locked: assigning a key that does not exist fails at once, naming it). Overrides come
as ``--config.KEY=VALUE`` and are parsed with the key's declared type. ``validate`` checks every key
(unknown keys, types, choices, ranges, cross-field rules) before any work starts, and every message
names the offending key.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A bad config; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Field:
    default: Any
    type: type | tuple[type, ...]
    help: str = ""
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    optional: bool = False  # None allowed


def _f(default: Any, typ: Any, help: str = "", **kw: Any) -> Field:
    return Field(default, typ, help, **kw)


NUM = (int, float)
SCHEMA: dict[str, Any] = {
    "workdir": _f("runs/poer", str, "checkpoints, metrics.jsonl, TensorBoard events, exported model"),
    "seed": _f(0, int, "seeds data order, sampling, truncation and cache updates"),
    "resume": _f(True, bool, "continue from the latest checkpoint in workdir when there is one"),
    "model": {
        "path": _f(None, str, "local HF model directory (config.json + safetensors)", optional=True),
        "preset": _f(None, str, "random weights of a real shape (poer_jax.model.preset_names())", optional=True),
        "tokenizer_path": _f(None, str, "tokenizer directory; default: model.path", optional=True),
        "param_dtype": _f("float32", str, choices=("float32", "bfloat16")),
        "dtype": _f("float32", str, "matmul dtype", choices=("float32", "bfloat16")),
        "remat": _f(False, bool, "rematerialise each layer in the backward pass"),
    },
    "data": {
        "train_path": _f(None, str, "JSONL, Parquet or saved HF dataset directory", optional=True),
        "eval_path": _f(None, str, optional=True),
        "problem_key": _f("problem", str),
        "solution_key": _f("solution", str),
        "answer_key": _f("answer", str),
        "system_prompt": _f(None, str, "default: the open-rs system prompt", optional=True),
        "chat_template": _f("auto", str, choices=("auto", "always", "never")),
        "max_prompt_len": _f(512, int, min=1),
        "on_too_long": _f("error", str, choices=("error", "skip")),
        "questions_per_step": _f(8, int, "questions (groups) per step, global", min=1),
        "limit": _f(None, int, "use only the first N rows", optional=True, min=1),
        "eval_limit": _f(None, int, optional=True, min=1),
    },
    "rollout": {
        "strategy": _f("poer", str, "poer: continue cached prefixes; full: plain GRPO/DAPO", choices=("poer", "full")),
        "group_size": _f(6, int, "G", min=1),
        "temperature": _f(0.7, NUM, min=0.0),
        "top_p": _f(1.0, NUM, min=0.0, max=1.0),
        "top_k": _f(0, int, "0 = off", min=0),
        "max_completion_len": _f(4096, int, min=1),
        "page_size": _f(16, int, min=1),
        "kv_cache_gb": _f(16.0, NUM, "KV pool per device in GB (K and V, all layers), capped at what the device's "
                          "share of a step can use at once; samples that do not fit wait for finished ones' pages",
                          min=0.0),
        "kv_cache_fraction": _f(None, NUM, "KV pool per device as this fraction of its free memory when the "
                                "sampler is built (backends that report memory: GPU, TPU); overrides kv_cache_gb",
                                optional=True, min=0.0, max=1.0),
        "num_pages": _f(0, int, "KV pages per device, overriding the budget; 0 = from kv_cache_gb / "
                        "kv_cache_fraction", min=0),
        "attention_kernel": _f("auto", str, "decode attention: auto (by platform), xla (pure JAX), pallas_gpu "
                               "(Triton), pallas_tpu (Mosaic)", choices=("auto", "xla", "pallas_gpu", "pallas_tpu")),
        "layer_loop": _f("auto", str, "decode step over layers: auto (unrolled on CPU), scan, unrolled",
                         choices=("auto", "scan", "unrolled")),
    },
    "cache": {
        "init": _f("sample", str, "sample: one answer per question from the initial policy (Eq. 1)",
                   choices=("sample", "solutions", "file")),
        "init_file": _f(None, str, "JSONL of answers from another model (cache.init='file')", optional=True),
        "max_truncation": _f(300, int, "L in m ~ U{0..L} (Eq. 3)", min=0),
        "truncation_fraction": _f(None, NUM, "dynamic L = fraction x shortest response (Eq. 4)",
                                  optional=True, min=0.0, max=1.0),
        "truncation_mode": _f("paper", str, choices=("paper", "authors")),
        "budget": _f("max_length", str, "continuation budget", choices=("removed", "max_length")),
        "update_mode": _f("epsilon_greedy", str, "Eq. 9", choices=("epsilon_greedy", "none", "authors")),
        "epsilon": _f(0.1, NUM, min=0.0, max=1.0),
    },
    "reward": {
        "functions": _f(("accuracy",), (tuple, list), "accuracy | format | cosine | module:function"),
        "weights": _f(None, (tuple, list), "one weight per function; default all 1", optional=True),
        "cosine_max_len": _f(1000, int, min=1),
        "timeout_s": _f(10.0, NUM, min=0.01),
        "num_workers": _f(2, int, min=1),
        "length_aware": _f(True, bool, "length-aware reward shaping (Eq. 10)"),
        "length_variant": _f("paper", str, choices=("paper", "correct_only")),
        "alpha": _f(0.01, NUM, min=0.0),
        "r_min": _f(0.5, NUM),
        "r_max": _f(1.0, NUM),
        "overlong_buffer": _f(0, int, "DAPO overlong shaping buffer in tokens; 0 = off", min=0),
        "overlong_penalty": _f(1.0, NUM, min=0.0),
        "dynamic_sampling": _f(False, bool, "DAPO: drop zero-spread groups and refill"),
        "max_sampling_attempts": _f(10, int, min=1),
        "advantage_scale": _f("group", str, choices=("group", "batch", "none")),
    },
    "loss": {
        "objective": _f("ppo_clip", str, choices=("ppo_clip", "vanilla_pg")),
        "epsilon_low": _f(0.2, NUM, min=0.0),
        "epsilon_high": _f(0.2, NUM, min=0.0),
        "dual_clip": _f(None, NUM, optional=True, min=1.0),
        "beta": _f(0.0, NUM, "KL weight; 0 loads no reference model", min=0.0),
        "aggregation": _f("seq_mean_token_mean", str, choices=("token_mean", "seq_mean_token_mean", "dr_grpo")),
        "prefix_in_loss": _f(False, bool, "train the reused prefix too (the authors' code)"),
        "logprob_chunk": _f(256, int, "sequence chunk for log-probs (never a [B, T, V] array)", min=1),
    },
    "optim": {
        "learning_rate": _f(1e-6, NUM, min=0.0),
        "warmup_steps": _f(0, int, min=0),
        "min_lr_ratio": _f(0.1, NUM, min=0.0, max=1.0),
        "weight_decay": _f(0.0, NUM, min=0.0),
        "b1": _f(0.9, NUM, min=0.0, max=1.0),
        "b2": _f(0.99, NUM, min=0.0, max=1.0),
        "eps": _f(1e-8, NUM, min=0.0),
        "max_grad_norm": _f(1.0, NUM, min=0.0),
        "num_iterations": _f(1, int, "mu: updates per rollout", min=1),
        "num_minibatches": _f(1, int, min=1),
        "micro_batches": _f(1, int, "gradient accumulation per mini-batch", min=1),
    },
    "train": {
        "max_steps": _f(100, int, min=1),
        "checkpoint_every": _f(50, int, min=1),
        "keep_checkpoints": _f(2, int, min=1),
        "log_every": _f(1, int, min=1),
        "export_final": _f(True, bool, "write workdir/export as an HF directory at the end"),
    },
    "eval": {
        "every": _f(0, int, "evaluate every N steps; 0 = only at the start and the end", min=0),
        "num_samples": _f(1, int, "k samples per problem (avg@k)", min=1),
        "temperature": _f(0.6, NUM, min=0.0),
        "top_p": _f(0.95, NUM, min=0.0, max=1.0),
        "max_new_tokens": _f(None, int, "default: rollout.max_completion_len", optional=True, min=1),
        "enabled": _f(True, bool),
    },
    "mesh": {
        "data": _f(1, int, min=-1),
        "fsdp": _f(-1, int, min=-1),
        "tensor": _f(1, int, min=-1),
        "num_devices": _f(0, int, "use the first N devices (0 = all)", min=0),
    },
    "warm_start": {
        "steps": _f(0, int, "supervised steps on the reference solutions before RL (toy demo); 0 = off", min=0),
        "learning_rate": _f(3e-3, NUM, min=0.0),
        "batch_size": _f(32, int, min=1),
    },
    "toy": {
        "enabled": _f(False, bool, "generate the built-in arithmetic task, tokenizer and tiny model in workdir"),
        "num_train": _f(2000, int, min=1),
        "num_test": _f(200, int, min=1),
        "max_value": _f(9, int, "operands are drawn from 0..max_value", min=1),
        "max_operands": _f(3, int, min=2),
        "word_problem_fraction": _f(0.0, NUM, min=0.0, max=1.0),
        "hidden_size": _f(64, int, min=8),
        "num_layers": _f(2, int, min=1),
    },
}


def _build(schema: dict[str, Any]) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict()
    for k, v in schema.items():
        out[k] = _build(v) if isinstance(v, dict) else v.default
    return out


def default_config() -> ml_collections.ConfigDict:
    """Every key with its default; locked, so a typo in a config file fails at once."""
    cfg = _build(SCHEMA)
    cfg.lock()
    return cfg


def field(key: str) -> Field:
    node: Any = SCHEMA
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown config key {key!r}")
        node = node[part]
    if not isinstance(node, Field):
        raise ConfigError(f"config key {key!r} is a section, not a value")
    return node


def _check_value(key: str, f: Field, value: Any) -> None:
    if value is None:
        if not f.optional:
            raise ConfigError(f"config key {key!r} may not be None")
        return
    types = f.type if isinstance(f.type, tuple) else (f.type,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = "/".join(t.__name__ for t in types)
        raise ConfigError(f"config key {key!r} must be {names}, got {type(value).__name__} {value!r}")
    if f.choices is not None and value not in f.choices:
        raise ConfigError(f"config key {key!r} must be one of {list(f.choices)}, got {value!r}")
    if f.min is not None and value < f.min:
        raise ConfigError(f"config key {key!r} must be >= {f.min}, got {value!r}")
    if f.max is not None and value > f.max:
        raise ConfigError(f"config key {key!r} must be <= {f.max}, got {value!r}")


def _walk(schema: dict[str, Any], cfg: Any, prefix: str) -> None:
    given = set(cfg.keys())
    for k in sorted(given - set(schema)):
        raise ConfigError(f"unknown config key {prefix + k!r}")
    for k, f in schema.items():
        key = prefix + k
        if k not in given:
            raise ConfigError(f"config key {key!r} is missing (start config files from default_config())")
        if isinstance(f, dict):
            if not hasattr(cfg[k], "keys"):
                raise ConfigError(f"config key {key!r} must be a section")
            _walk(f, cfg[k], key + ".")
        else:
            _check_value(key, f, cfg[k])


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check keys, types, choices, ranges and cross-field rules; raise ConfigError naming the key."""
    _walk(SCHEMA, cfg, "")
    if (cfg.model.path is None) == (cfg.model.preset is None) and not cfg.toy.enabled:
        raise ConfigError("config keys 'model.path' and 'model.preset': set exactly one")
    if cfg.data.train_path is None and not cfg.toy.enabled:
        raise ConfigError("config key 'data.train_path' is required")
    if cfg.cache.init == "file" and not cfg.cache.init_file:
        raise ConfigError("config key 'cache.init_file' is required when cache.init='file'")
    if cfg.reward.weights is not None and len(cfg.reward.weights) != len(cfg.reward.functions):
        raise ConfigError(f"config key 'reward.weights' has {len(cfg.reward.weights)} entries, "
                          f"reward.functions has {len(cfg.reward.functions)}")
    if not cfg.reward.functions:
        raise ConfigError("config key 'reward.functions' must name at least one reward")
    if cfg.rollout.kv_cache_gb <= 0:
        raise ConfigError(f"config key 'rollout.kv_cache_gb' must be > 0, got {cfg.rollout.kv_cache_gb!r}")
    if cfg.rollout.kv_cache_fraction is not None and cfg.rollout.kv_cache_fraction <= 0:
        raise ConfigError(f"config key 'rollout.kv_cache_fraction' must be in (0, 1], got "
                          f"{cfg.rollout.kv_cache_fraction!r}")
    if cfg.reward.r_min > cfg.reward.r_max:
        raise ConfigError("config keys 'reward.r_min' and 'reward.r_max': r_min must be <= r_max")
    q = cfg.data.questions_per_step
    if (q * cfg.rollout.group_size) % (cfg.optim.num_minibatches * cfg.optim.micro_batches):
        raise ConfigError(
            f"config key 'optim.num_minibatches' x 'optim.micro_batches' = "
            f"{cfg.optim.num_minibatches * cfg.optim.micro_batches} must divide the "
            f"{q * cfg.rollout.group_size} samples of a step (data.questions_per_step x rollout.group_size)")
    return cfg


def parse_value(key: str, text: str) -> Any:
    """Parse a command-line value with the key's declared type."""
    f = field(key)
    if text in ("None", "none", "null") and f.optional:
        return None
    types = f.type if isinstance(f.type, tuple) else (f.type,)
    try:
        if bool in types:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if str in types:
            return text
        if tuple in types or list in types:
            if text.startswith(("(", "[")):
                value = ast.literal_eval(text)
            else:
                value = [s for s in text.split(",") if s]
                value = [ast.literal_eval(s) if s.replace(".", "", 1).isdigit() else s for s in value]
            return tuple(value)
        if float in types:
            v = float(text)
            return int(v) if int in types and v.is_integer() and "." not in text and "e" not in text else v
        if int in types:
            return int(text)
    except (ValueError, SyntaxError):
        pass
    names = "/".join(t.__name__ for t in types)
    raise ConfigError(f"config key {key!r}: cannot parse {text!r} as {names}")


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    spec = importlib.util.spec_from_file_location(f"_poer_config_{p.stem}", p)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        cfg = module.get_config()
    except AttributeError as e:
        # a locked ConfigDict names the key that does not exist
        raise ConfigError(f"{p}: {e}") from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{p}: get_config() must return an ml_collections.ConfigDict")
    return cfg


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``KEY=VALUE`` strings (keys dotted, e.g. 'train.max_steps=5')."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # unlocked copy: None-valued fields may take any type
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like --config.KEY=VALUE")
        key, text = item.split("=", 1)
        value = parse_value(key, text)
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


def config_from_argv(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """``--config=FILE [--config.KEY=VALUE ...]`` -> validated ConfigDict."""
    path, overrides = None, []
    for arg in argv:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            raise ConfigError(f"unknown argument {arg!r}; usage: --config=FILE [--config.KEY=VALUE ...]")
    if path is None:
        raise ConfigError("missing --config=FILE (e.g. --config=configs/toy.py)")
    return validate(apply_overrides(load_config_file(path), overrides))


def describe() -> str:
    """All keys with defaults and help, for --help."""
    lines: list[str] = []

    def walk(schema: dict[str, Any], prefix: str) -> None:
        for k, f in schema.items():
            if isinstance(f, dict):
                walk(f, f"{prefix}{k}.")
            else:
                extra = f" {list(f.choices)}" if f.choices else ""
                lines.append(f"  {prefix + k:<32} {f.default!r:<22} {f.help}{extra}")

    walk(SCHEMA, "")
    return "\n".join(lines)
