"""The training configuration: one schema, the defaults it implies, validation and command-line overrides.

Config files are Python files with ``get_config() -> ml_collections.ConfigDict`` that start from
``default_config()`` (locked: assigning a key that does not exist fails at once, naming it). Overrides come
as ``--config.KEY=VALUE`` and are parsed with the key's declared type. ``validate`` checks every key
(unknown keys, types, choices, ranges, cross-field rules, that reward import paths import) before any work
starts, and every message names the offending key; an unknown key gets the closest known one suggested.

Every key is a :class:`Field` with help text (``--help`` prints them with a config file's values). A
field marked ``resume_safe`` may change when a run is resumed (logged); changing any other field of a run
in progress is refused (``poer_jax.train.run_dir``), since the resumed run would no longer be the run its
checkpoints came from.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from poer_jax.system.schema import BF16_MIN_LEARNING_RATE, SCHEMA, Field  # the key table (re-exported)


class ConfigError(ValueError):
    """A bad config; the message names the key."""




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


def keys(schema: dict[str, Any] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, in schema order."""
    out: list[str] = []
    for k, f in (SCHEMA if schema is None else schema).items():
        out += keys(f, f"{prefix}{k}.") if isinstance(f, dict) else [prefix + k]
    return out


def suggest(key: str) -> str:
    """``"; did you mean 'x.y'?"`` for the known key closest to ``key`` (or to its last part), else ``""``."""
    known = keys()
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if not match:  # a key without its section (max_steps) or in the wrong one (data.group_size)
        last = key.rsplit(".", 1)[-1]
        by_last = {k.rsplit(".", 1)[-1]: k for k in known}
        close = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.75)
        match = [by_last[close[0]]] if close else []
    return f"; did you mean {match[0]!r}?" if match else ""


def unknown_key_error(key: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}{suggest(key)} (python -m poer_jax.train --help lists every key)")


def field(key: str) -> Field:
    node: Any = SCHEMA
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise unknown_key_error(key)
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
        raise unknown_key_error(prefix + k)
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


def _check_reward_functions(names: Sequence[str]) -> None:
    """Built-in names exist and ``module:function`` / ``file.py:function`` paths import, before any work."""
    from poer_jax.rewards.functions import BUILTIN_REWARDS, load_reward_function

    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"config key 'reward.functions': {name!r} is not a name or an import path")
        if ":" not in name:
            if name not in BUILTIN_REWARDS:
                close = difflib.get_close_matches(name, BUILTIN_REWARDS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"config key 'reward.functions': unknown reward {name!r}{hint} (built-ins: "
                                  f"{', '.join(BUILTIN_REWARDS)}, or an import path 'module:function')")
            continue
        try:
            load_reward_function(name)
        except ValueError as e:
            raise ConfigError(f"config key 'reward.functions': {e}") from e


def _check_model_sources(cfg: ml_collections.ConfigDict) -> None:
    """No key silently replaces another: where the model, its tokenizer or the data would come from two keys,
    fail naming both. The rules a run follows (and prints at its start, ``system.start.run_sources``):

    - ``toy.enabled`` builds the task's own tokenizer and a random model (``workdir/toy``): with it, the model keys
      (``model.path``, ``model.preset``, ``model.tokenizer_path``) are refused; the data keys, when given, are
      read instead of the generated problems;
    - ``warm_start.path`` is the starting model, weights and tokenizer: with it, the model keys are refused (a
      toy task's tokenizer is checked against the warm start's); ``warm_start.steps`` is then only what
      ``scripts/warm_start.py`` trains when it remakes that directory.
    """
    given = [k for k in ("model.path", "model.preset", "model.tokenizer_path")
             if cfg.model[k.split(".", 1)[1]] is not None]
    if cfg.toy.enabled and given:
        raise ConfigError(
            f"config keys 'toy.enabled' and {given[0]!r}: toy.enabled=true builds the task's own tokenizer and model "
            f"in workdir/toy, which would replace {given[0]}={cfg.model[given[0].split('.', 1)[1]]!r}; to train "
            f"that model on your data set --config.toy.enabled=false (with data.train_path), else drop {given[0]}")
    if cfg.warm_start.path and given:
        raise ConfigError(
            f"config keys 'warm_start.path' and {given[0]!r}: the warm start ({cfg.warm_start.path}) is the model "
            f"and tokenizer the run starts from, and would replace {given[0]}="
            f"{cfg.model[given[0].split('.', 1)[1]]!r}; set one of them (--config.warm_start.path=None to start "
            f"from {given[0]})")


def _check_lora(lora: ml_collections.ConfigDict) -> None:
    """The LoRA keys, checked whatever the rank (a config that turns LoRA on later is already sound)."""
    from poer_jax.model.lora import LORA_TARGETS

    targets = list(lora.targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ConfigError(f"config key 'lora.targets' must name products among {', '.join(LORA_TARGETS)}, got "
                          f"{targets}" + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else ""))
    if len(set(targets)) != len(targets):
        raise ConfigError(f"config key 'lora.targets' names a product twice: {targets}")
    if lora.rank > 0 and not lora.alpha > 0:
        raise ConfigError(f"config key 'lora.alpha' must be > 0 with lora.rank={lora.rank}, got {lora.alpha!r}")
    if lora.dropout >= 1:
        raise ConfigError(f"config key 'lora.dropout' must be < 1 (1 drops every input), got {lora.dropout!r}")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check keys, types, choices, ranges and cross-field rules; raise ConfigError naming the key."""
    _walk(SCHEMA, cfg, "")
    _check_model_sources(cfg)
    if (cfg.model.path is None) == (cfg.model.preset is None) and not cfg.toy.enabled:
        raise ConfigError("config keys 'model.path' and 'model.preset': set exactly one")
    if cfg.data.train_path is None and not cfg.toy.enabled:
        raise ConfigError("config key 'data.train_path' is required")
    if cfg.cache.truncation_mode == "authors" and cfg.cache.truncation != "fixed":
        raise ConfigError("config key 'cache.truncation' must be 'fixed' with cache.truncation_mode='authors' "
                          f"(the authors' code draws m from a fixed L), got {cfg.cache.truncation!r}")
    if cfg.cache.truncation_mode == "authors" and cfg.cache.max_truncation < 2:
        raise ConfigError("config key 'cache.max_truncation' must be >= 2 with cache.truncation_mode='authors' "
                          f"(m = randint(1, L)), got {cfg.cache.max_truncation}")
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
    if cfg.model.param_dtype == "bfloat16" and 0 < cfg.optim.learning_rate < BF16_MIN_LEARNING_RATE:
        raise ConfigError(
            f"config key 'model.param_dtype': bfloat16 master weights lose every update of learning rate "
            f"{cfg.optim.learning_rate:g} (Adam moves a weight by ~lr per step; bfloat16 rounds away changes below "
            f"~2^-9 of a weight, 4e-5 at 0.02): use model.param_dtype='float32' with model.dtype='bfloat16' "
            f"(float32 weights and moments, bfloat16 matmuls) or optim.learning_rate >= {BF16_MIN_LEARNING_RATE:g}")
    if cfg.rollout.group_size == 1:
        raise ConfigError("config key 'rollout.group_size' is 1: every group-relative advantage (Eq. 6) would be 0 "
                          "and nothing would be learned; use 2 or more samples per question")
    if cfg.cache.max_truncation > cfg.rollout.max_completion_len:
        raise ConfigError(f"config key 'cache.max_truncation' ({cfg.cache.max_truncation}) is larger than "
                          f"'rollout.max_completion_len' ({cfg.rollout.max_completion_len}): no cached answer is "
                          "that long, so L would never be reached")
    cap = cfg.rollout.max_continuation_len
    if cap is not None and cap > cfg.rollout.max_completion_len:
        raise ConfigError(f"config key 'rollout.max_continuation_len' ({cap}) is larger than "
                          f"'rollout.max_completion_len' ({cfg.rollout.max_completion_len}): it would cap nothing")
    kernel, layout = cfg.rollout.attention_kernel, cfg.rollout.kv_layout
    if (kernel, layout) in (("pallas_tpu", "split"), ("pallas_gpu", "fused")):
        reads = "fused" if kernel == "pallas_tpu" else "split"
        raise ConfigError(f"config key 'rollout.kv_layout' is {layout!r}: the {kernel} kernel "
                          f"('rollout.attention_kernel') reads only the {reads} pool layout; use 'auto'")
    _check_reward_functions(cfg.reward.functions)
    _check_lora(cfg.lora)
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
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{p}: defines no get_config() (start from poer_jax.system.config.default_config())")
        cfg = module.get_config()
    except (AttributeError, TypeError) as e:
        # a locked ConfigDict refuses a key that does not exist, or a value of another type
        raise _config_file_error(p, e) from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{p}: get_config() must return an ml_collections.ConfigDict")
    return cfg


def _config_file_error(path: Path, e: Exception) -> ConfigError:
    """``file:line: unknown config key 'a.b'; did you mean 'a.c'?`` from a locked ConfigDict's error."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    where = f"{path}:{frames[-1].lineno}" if frames else str(path)
    source = (frames[-1].line or "") if frames else ""
    assigned = re.match(r"\s*\w+\.([\w.]+)\s*=", source)  # "c.rollout.group_sise = 4" -> rollout.group_sise
    if isinstance(e, AttributeError) and assigned and assigned.group(1) not in keys():
        return ConfigError(f"{where}: {unknown_key_error(assigned.group(1))}")
    missing = re.search(r'Key "(\w+)" does not exist', str(e))
    if isinstance(e, AttributeError) and missing:
        return ConfigError(f"{where}: {unknown_key_error(missing.group(1))}")
    detail = str(e).split("\n")[0]
    key = f"config key {assigned.group(1)!r}: " if assigned else ""
    return ConfigError(f"{where}: {key}{detail}" + (f" (in {source.strip()!r})" if source and not assigned else ""))


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


def parse_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``--config=FILE [--config.KEY=VALUE ...]`` -> (FILE or None, ["KEY=VALUE", ...])."""
    path, overrides = None, []
    for arg in argv:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            raise ConfigError(f"unknown argument {arg!r}; usage: --config=FILE [--config.KEY=VALUE ...]")
    return path, overrides


def config_from_argv(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """``--config=FILE [--config.KEY=VALUE ...]`` -> validated ConfigDict."""
    path, overrides = parse_argv(argv)
    if path is None:
        raise ConfigError("missing --config=FILE (e.g. --config=configs/toy.py)")
    return validate(apply_overrides(load_config_file(path), overrides))


def describe(cfg: ml_collections.ConfigDict | None = None) -> str:
    """Every key with its value (``cfg``'s, else the default) and help, for ``--help``.

    A value that differs from the default is followed by ``(default: ...)``; keys that may change when a
    run is resumed are marked ``[resume-safe]``.
    """
    lines: list[str] = []

    def walk(schema: dict[str, Any], node: Any, prefix: str) -> None:
        for k, f in schema.items():
            key = prefix + k
            if isinstance(f, dict):
                lines.append(f"{key}:")
                walk(f, None if node is None else node[k], f"{key}.")
                continue
            value = f.default if node is None else node[k]
            text = f"  {key:<32} {_show(value):<22} {f.help}"
            if f.choices:
                text += f" {{{', '.join(map(str, f.choices))}}}"
            if node is not None and value != f.default:
                text += f" (default: {_show(f.default)})"
            if f.resume_safe:
                text += " [resume-safe]"
            lines.append(text)

    walk(SCHEMA, cfg, "")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if value else "()"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
