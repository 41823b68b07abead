"""Everything a run needs before its first step: tokenizer, model, the built-in toy task, the warm start.

The toy task and the warm start are caches in the workdir (``toy/``, ``warm_start/``), each with the
settings it was made from in ``settings.json``: a run with other settings makes them again (the old one is
moved to ``workdir/previous/``), so a cache never silently stands in for another configuration.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from poer_jax.model import QwenConfig, export_hf, init_params, load_hf, preset
from poer_jax.model.sharding import param_shardings
from poer_jax.train.config import ConfigError
from poer_jax.train.multihost import barrier, host_copy, is_main_process
from poer_jax.train.warm_start import supervised_warm_start

log = logging.getLogger("poer_jax")


def enable_compilation_cache(cfg: ml_collections.ConfigDict) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``train.compilation_cache_dir`` (default: the
    ``JAX_COMPILATION_CACHE_DIR`` environment variable when set, else ``workdir/jax_cache``; '' = off): a
    restarted or resumed run loads its compiled programs instead of compiling them again (minutes each at
    7B scale). Returns the directory."""
    d = cfg.train.compilation_cache_dir
    if d == "":
        return None
    if d is None:
        d = os.environ.get("JAX_COMPILATION_CACHE_DIR") or Path(cfg.workdir) / "jax_cache"
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != str(path):
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()  # a cache already opened in this process keeps its directory otherwise
        jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def load_tokenizer(path: str | Path) -> Any:
    """A transformers tokenizer from a local directory.

    A directory whose tokenizer_config.json names ``PreTrainedTokenizerFast`` is loaded with that class:
    ``AutoTokenizer`` would swap in Qwen's own tokenizer class when config.json says qwen2.
    """
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"tokenizer directory {p} does not exist (config key 'model.tokenizer_path')")
    tc = p / "tokenizer_config.json"
    try:
        if tc.is_file() and json.loads(tc.read_text()).get("tokenizer_class") == "PreTrainedTokenizerFast":
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(str(p))
        else:  # AutoTokenizer imports transformers' model configs, and with them torch when installed (~3 s)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: cannot load a tokenizer ({e})") from e
    if len(tok) == 0 or not tok("1 + 1")["input_ids"]:
        raise ConfigError(f"{p}: the tokenizer is empty (no tokenizer.json / vocab files in the directory?)")
    return tok


def eos_and_pad(tokenizer: Any, model_dir: str | Path | None) -> tuple[tuple[int, ...], int]:
    """EOS ids (tokenizer's plus generation_config.json's) and the pad id (pad token, else the first EOS)."""
    eos: list[int] = []
    if tokenizer.eos_token_id is not None:
        eos.append(int(tokenizer.eos_token_id))
    if model_dir is not None and (Path(model_dir) / "generation_config.json").is_file():
        gen = json.loads((Path(model_dir) / "generation_config.json").read_text()).get("eos_token_id")
        for e in gen if isinstance(gen, list) else [gen]:
            if e is not None and int(e) not in eos:
                eos.append(int(e))
    if not eos:
        raise ConfigError("the tokenizer has no EOS token and generation_config.json names none")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return tuple(eos), int(pad)


def load_model(cfg: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Any, QwenConfig]:
    """Parameters on the mesh, from ``model.path`` (HF directory) or ``model.preset`` (random weights)."""
    dtypes = dict(param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype, remat=cfg.model.remat,
                  attention=cfg.model.attention)
    if cfg.model.path is not None:
        return load_hf(cfg.model.path, mesh=mesh, **dtypes)
    mcfg = preset(cfg.model.preset, **dtypes)
    # created in place on the mesh: no process holds the whole model, none builds it on one device first
    init = jax.jit(lambda k: init_params(mcfg, k), out_shardings=param_shardings(mcfg, mesh))
    return init(jax.random.key(cfg.seed)), mcfg


SETTINGS = "settings.json"


def _cache_is_current(directory: Path, settings: dict[str, Any], what: str) -> bool:
    """Whether the cache ``directory`` was made with ``settings``; a stale one is moved aside (process 0)."""
    if not (directory / "config.json").is_file() and not (directory / "model" / "config.json").is_file():
        return False
    path = directory / SETTINGS
    if not path.is_file():
        return True  # made before settings were recorded: trusted, as it was then
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if saved == json.loads(json.dumps(settings)):
        return True
    if is_main_process():
        dest = directory.parent / "previous" / f"{directory.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(directory, dest)
        log.warning("%s: %s was made with other settings; making it again (the old one is now in %s)", what,
                    directory, dest)
    barrier(f"poer_jax.stale_{directory.name}")
    return False


def toy_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    return {"toy": cfg.toy.to_dict(), "seed": cfg.seed}


def prepare_toy(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Generate the toy arithmetic task, its tokenizer and a tiny random Qwen2 in ``workdir/toy`` (once per
    set of ``toy.*`` settings and seed).

    Returns a copy of cfg pointing ``model.path`` and (where not set) ``data.train_path`` /
    ``data.eval_path`` at them. Multi-host: process 0 writes them (``workdir`` is shared), the others wait.
    """
    from poer_jax.tasks import TASKS, make_task_splits, task_completion
    from poer_jax.tasks.tiny_tokenizer import make_tiny_tokenizer
    from poer_jax.tasks.toy import write_jsonl

    root = Path(cfg.workdir) / "toy"
    model_dir = root / "model"
    train_path, test_path = root / "train.jsonl", root / "test.jsonl"
    if not _cache_is_current(root, toy_settings(cfg), "toy task") and is_main_process():
        t = cfg.toy
        log.info("toy task: generating %d %s problems + %d held out, a tokenizer and a tiny Qwen2 in %s",
                 t.num_train, t.task, t.num_test, root)
        try:
            train, test = make_task_splits(t.task, t.num_train, t.num_test, seed=cfg.seed, max_value=t.max_value,
                                           min_operands=t.min_operands, max_operands=t.max_operands,
                                           word_problem_fraction=t.word_problem_fraction)
        except ValueError as e:
            raise ConfigError(f"config section 'toy': {e}") from e
        write_jsonl(train, train_path)
        write_jsonl(test, test_path)
        corpus = [r["problem"] for r in train] + [task_completion(t.task, r) for r in train]
        make_tiny_tokenizer(root / "tokenizer", corpus, word_tokens=TASKS[t.task].word_tokens)
        tok = load_tokenizer(root / "tokenizer")
        h = cfg.toy.hidden_size
        mcfg = QwenConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=4 * h, num_layers=cfg.toy.num_layers,
                          num_heads=4, num_kv_heads=2, head_dim=h // 4, max_position_embeddings=2048)
        params = init_params(mcfg, jax.random.key(cfg.seed))
        tmp = root / "model.tmp"
        export_hf(params, mcfg, tmp, tokenizer_dir=root / "tokenizer")
        hf = json.loads((tmp / "config.json").read_text())
        hf.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        tmp.replace(model_dir)
        (root / SETTINGS).write_text(json.dumps(toy_settings(cfg), indent=2))
    barrier("poer_jax.prepare_toy")
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.model.path = str(model_dir)
    out.model.preset = None
    out.model.tokenizer_path = str(model_dir)
    out.data.train_path = out.data.train_path or str(train_path)
    out.data.eval_path = out.data.eval_path or str(test_path)
    return out


def use_warm_start(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Start from the model in ``warm_start.path`` (weights and tokenizer) instead of a supervised run.

    The directory must hold an HF model; with a generated toy task its tokenizer must be the task's (same
    vocabulary), else the weights would read other token ids: both failures name the regeneration command.
    """
    path = Path(cfg.warm_start.path)
    redo = "regenerate it with: python scripts/warm_start.py --config=<this config>"
    if not (path / "config.json").is_file():
        raise ConfigError(f"config key 'warm_start.path': {path} holds no model (no config.json); {redo}")
    tok_path = cfg.model.tokenizer_path or cfg.model.path
    if cfg.toy.enabled and tok_path is not None:
        mine, theirs = load_tokenizer(tok_path).get_vocab(), load_tokenizer(path).get_vocab()
        if mine != theirs:
            raise ConfigError(f"config key 'warm_start.path': the tokenizer in {path} is not the one of the "
                              f"task in {tok_path} (toy.task={cfg.toy.task!r}); {redo}")
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.model.path = str(path)
    out.model.preset = None
    out.model.tokenizer_path = str(path)
    return out


def warm_start_target(row: dict[str, Any], cfg: ml_collections.ConfigDict) -> str:
    """The supervised target of a training row: the built-in task's completion, else the reference solution."""
    if cfg.toy.enabled:
        from poer_jax.tasks import task_completion

        return task_completion(cfg.toy.task, row)
    return row.get("solution") or f"\\boxed{{{row.get('answer')}}}"


def warm_start_dir(cfg: ml_collections.ConfigDict) -> Path:
    return Path(cfg.workdir) / "warm_start"


def warm_start_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the warm-started model depends on: its own settings, the model it starts from, the prompts."""
    d = cfg.data
    return {"warm_start": cfg.warm_start.to_dict(), "seed": cfg.seed, "model": cfg.model.path,
            "preset": cfg.model.preset, "param_dtype": cfg.model.param_dtype, "toy": cfg.toy.to_dict(),
            "data": {k: d[k] for k in ("train_path", "limit", "problem_key", "solution_key", "answer_key",
                                       "system_prompt", "chat_template", "max_prompt_len", "on_too_long")}}


def run_warm_start(cfg: ml_collections.ConfigDict, tokenizer: Any, prompt_ids: list[np.ndarray],
                   targets: list[str], mesh: Mesh, out_dir: str | Path | None = None,
                   callback: Callable[[int, Any, QwenConfig], bool] | None = None,
                   callback_every: int = 0) -> ml_collections.ConfigDict:
    """Supervised warm start on (prompt, reference solution) pairs, cached as an HF directory in workdir
    (or ``out_dir``).

    A second run with the same settings finds the model there and skips the training. Returns a config
    whose ``model.path`` is the warm-started model. ``callback(step, params, model_config)`` every
    ``callback_every`` steps may stop it early (``supervised_warm_start``). Multi-host: every process
    trains, process 0 writes.
    """
    from poer_jax.train.progress import TaskProgress

    out_dir = Path(out_dir) if out_dir is not None else warm_start_dir(cfg)
    settings = warm_start_settings(cfg)
    if not _cache_is_current(out_dir, settings, "warm start"):
        params, mcfg = load_model(cfg, mesh)
        eos_ids, pad_id = eos_and_pad(tokenizer, cfg.model.path)
        eos = eos_ids[0]
        target_ids = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos], np.int32)
                      for t in targets]
        log.info("warm start: %d supervised steps on %d examples", cfg.warm_start.steps, len(targets))
        with TaskProgress("warm start", cfg.warm_start.steps, unit="steps", quiet=not is_main_process()) as bar:
            params, losses = supervised_warm_start(
                params, mcfg, prompt_ids, target_ids, steps=cfg.warm_start.steps,
                learning_rate=cfg.warm_start.learning_rate, batch_size=cfg.warm_start.batch_size, seed=cfg.seed,
                pad_id=pad_id, warmup_steps=min(50, cfg.warm_start.steps // 10),
                micro_batches=cfg.warm_start.micro_batches, min_lr_ratio=cfg.warm_start.min_lr_ratio,
                callback=None if callback is None else lambda step, p: callback(step, p, mcfg),
                callback_every=callback_every, progress=lambda done, loss: bar.update(done, f"loss {loss:.3f}"))
        log.info("warm start: done, loss %.3f -> %.3f", losses[0], losses[-1])
        params = host_copy(params)  # a collective: every process takes part
        if is_main_process():
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            export_hf(params, mcfg, tmp, tokenizer_dir=cfg.model.tokenizer_path or cfg.model.path)
            (tmp / "warm_start_losses.json").write_text(json.dumps([float(x) for x in losses]))
            if cfg.model.path and (Path(cfg.model.path) / "generation_config.json").is_file():
                (tmp / "generation_config.json").write_text(
                    (Path(cfg.model.path) / "generation_config.json").read_text())
            (tmp / SETTINGS).write_text(json.dumps(settings, indent=2))
            tmp.replace(out_dir)
        barrier("poer_jax.warm_start")
    else:
        log.info("warm start: reusing %s", out_dir)
    out = ml_collections.ConfigDict(cfg.to_dict())
    if out.model.tokenizer_path is None:
        out.model.tokenizer_path = out.model.path
    out.model.path = str(out_dir)
    out.model.preset = None
    return out


def prepare_shared_start(cfg: ml_collections.ConfigDict, workdir: str | Path) -> ml_collections.ConfigDict:
    """One starting point for several runs (benchmarks, sweeps): generate the built-in task in ``workdir`` and
    resolve the warm start (``warm_start.path``, or a supervised run cached in ``workdir``) once.

    Returns a config pointing at the task's files and the starting model, with task generation and warm start
    off, so every run built from it (with its own ``workdir``) starts from the same weights and data.
    """
    from poer_jax.model.sharding import make_mesh
    from poer_jax.train import builders
    from poer_jax.train.config import apply_overrides, validate

    cfg = apply_overrides(cfg, [f"workdir={workdir}"])
    if cfg.toy.enabled:
        cfg = prepare_toy(cfg)
    if cfg.warm_start.path:
        cfg = use_warm_start(cfg)
    elif cfg.warm_start.steps > 0:
        text = builders.build_text(cfg)
        prompts = builders.build_prompts(cfg, text.tokenizer).train
        targets = [warm_start_target(r, cfg) for r in prompts.rows(range(len(prompts)))]
        cfg = run_warm_start(cfg, text.tokenizer, list(prompts.ids), targets, make_mesh({"fsdp": -1}))
    return validate(apply_overrides(cfg, ["toy.enabled=false", "warm_start.steps=0", "warm_start.path=None"]))
