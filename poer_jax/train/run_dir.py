"""The workdir of a run, and the rules that keep two runs from ever mixing in it.

A run leaves in its workdir ``run_config.json`` (the config it was started with, as the config file and
command line gave it), ``checkpoints/``, ``metrics.jsonl``, ``samples.jsonl``, ``tb/``, ``export/`` and, once
it has finished, ``summary.json``. ``toy/`` and ``warm_start/`` are caches keyed by their own settings
(``poer_jax.system.start``), not part of a run.

Starting a run (:func:`inspect`, read-only, then :func:`prepare`):

===========================================  =====================================  ==================
workdir                                      resume=true (default)                  overwrite=true
===========================================  =====================================  ==================
no run                                       fresh start                            fresh start
a run, same config but resume-safe keys      continue (changed keys logged)         moved aside, fresh
a run, another value of any other key        refused, naming each key (old -> new)  moved aside, fresh
a run that finished at train.max_steps       "already complete", nothing is done    moved aside, fresh
train.max_steps below the run's newest step  refused, naming train.max_steps        moved aside, fresh
===========================================  =====================================  ==================

``resume=false`` refuses any workdir that holds a run (it never continues one). "Moved aside" means
renamed into ``workdir/previous/<time>/`` (nothing is deleted), journaled so that a move cut short by a
kill is finished before anything else looks at the workdir. Which keys are resume-safe is declared per
key in the schema (``Field.resume_safe``): those that do not change what the run computes (evaluation,
logging, checkpoint cadence, sampler memory layout, the mesh) plus ``train.max_steps``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_collections

from poer_jax.system.config import SCHEMA, ConfigError, Field

log = logging.getLogger("poer_jax")

RUN_CONFIG = "run_config.json"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
BROKEN = "broken_checkpoints"
EXPORT = "export"
PREVIOUS = "previous"
MOVING = ".moving.json"  # journal of a move into previous/<time>/ in progress
# everything a run writes; "previous" is not here: old runs stay where overwrite put them
RUN_FILES = (RUN_CONFIG, CHECKPOINTS, BROKEN, "metrics.jsonl", "samples.jsonl", "tb", EXPORT, SUMMARY)
PRODUCED = ("metrics.jsonl", "samples.jsonl", EXPORT, SUMMARY)
# keys whose value is where / how the command was started, never a property of the run
NOT_COMPARED = frozenset({"workdir", "resume", "overwrite"})


@dataclass(frozen=True)
class RunStart:
    """What starting ``cfg`` in its workdir means.

    mode: "fresh" (step 0), "resume" (from the newest intact checkpoint) or "complete" (nothing to do).
    step: the newest checkpoint's step (None without one). changes: resume-safe keys that differ from the
    saved run, as "key: old -> new". overwrite: the workdir's run is moved aside by :func:`prepare`.
    """

    mode: str
    step: int | None = None
    changes: tuple[str, ...] = ()
    overwrite: bool = False
    summary: dict[str, Any] | None = field(default=None, compare=False)


def checkpoint_steps(workdir: str | os.PathLike[str]) -> list[int]:
    """Committed checkpoint steps in ``workdir/checkpoints``, ascending (Orbax step directories are named by
    their step once committed; a save cut short leaves a ``*.orbax-checkpoint-tmp*`` directory instead)."""
    d = Path(workdir) / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def holds_run(workdir: str | os.PathLike[str]) -> bool:
    """Whether a run has produced something in ``workdir`` (a checkpoint, metrics, samples, an export); a
    ``run_config.json`` alone is a start that failed before its first step and does not count."""
    w = Path(workdir)
    return bool(checkpoint_steps(w)) or any((w / name).exists() for name in PRODUCED)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def _fields(schema: dict[str, Any] = SCHEMA, prefix: str = "") -> dict[str, Field]:
    out: dict[str, Field] = {}
    for k, f in schema.items():
        out.update(_fields(f, f"{prefix}{k}.") if isinstance(f, dict) else {prefix + k: f})
    return out


def compare_configs(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed): the keys whose value differs, as ``"key: old -> new"``; refused ones change what
    the run computes, allowed ones are resume-safe. A key the saved config lacks (added to the schema
    since) counts as having its default there."""
    fields = _fields()
    old, new = _flatten(saved), _flatten(current)
    refused, allowed = [], []
    for key, f in fields.items():
        if key in NOT_COMPARED:
            continue
        default = tuple(f.default) if isinstance(f.default, list) else f.default
        a, b = old.get(key, default), new.get(key, default)
        if a != b and not (isinstance(a, int | float) and isinstance(b, int | float) and float(a) == float(b)):
            (allowed if f.resume_safe else refused).append(f"{key}: {a!r} -> {b!r}")
    return refused, allowed


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing or unreadable (a kill mid-write never leaves one:
    :func:`write_json` renames into place)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _saved_config(workdir: Path, steps: list[int]) -> dict[str, Any] | None:
    saved = read_json(workdir / RUN_CONFIG)
    if saved is not None or not steps:
        return saved
    # a run from before run_config.json existed: its newest checkpoint has the config
    from poer_jax.train.checkpoint import Checkpointer

    with Checkpointer(workdir / CHECKPOINTS, keep=max(1, len(steps))) as ckpt:
        try:
            extra = ckpt.restore_extra()
        except Exception:  # an unreadable newest checkpoint: the restore will fall back past it
            return None
    return extra.get("run_config") or extra.get("config")


def _describe_run(workdir: Path, steps: list[int]) -> str:
    return f"workdir {workdir} holds a run" + (f" (newest checkpoint: step {steps[-1]})" if steps else
                                              " that has no checkpoint yet")


def _way_out(workdir: Path) -> str:
    return (f"use another --config.workdir, or --config.overwrite=true to move the old run to "
            f"{workdir / PREVIOUS}/<time>/ and start over")


def inspect(cfg: ml_collections.ConfigDict) -> RunStart:
    """Decide how ``cfg`` starts in ``cfg.workdir`` (see the module table); raise ConfigError on a refusal.

    Reads only: nothing in the workdir changes (an overwrite happens in :func:`prepare`), except that a
    move into ``previous/`` cut short by a kill is finished first (process 0).
    """
    workdir = Path(cfg.workdir)
    finish_interrupted_moves(workdir)
    if not holds_run(workdir):
        return RunStart("fresh")
    if cfg.overwrite:
        return RunStart("fresh", overwrite=True)
    steps = checkpoint_steps(workdir)
    if not cfg.resume:
        raise ConfigError(f"{_describe_run(workdir, steps)} and --config.resume=false: it will not be continued "
                          f"or overwritten; use --config.resume=true to continue it, or {_way_out(workdir)}")
    saved = _saved_config(workdir, steps)
    if saved is None:
        raise ConfigError(f"{_describe_run(workdir, steps)} whose config cannot be read ({workdir / RUN_CONFIG}): "
                          f"{_way_out(workdir)}")
    refused, allowed = compare_configs(saved, cfg.to_dict())
    if refused:
        listed = "\n".join(f"  {r}" for r in refused)
        raise ConfigError(f"{_describe_run(workdir, steps)} whose config differs in keys that change what it "
                          f"computes:\n{listed}\nResume it with its own values, or {_way_out(workdir)}")
    step = steps[-1] if steps else None
    if step is not None and cfg.train.max_steps < step:
        raise ConfigError(f"config key 'train.max_steps' is {cfg.train.max_steps}, but the run in workdir {workdir} "
                          f"has reached step {step}: set it to {step} or more to continue, or {_way_out(workdir)}")
    summary = read_json(workdir / SUMMARY)
    finished = (summary is not None and summary.get("step") == step == cfg.train.max_steps
                and (not cfg.train.export_final or (workdir / EXPORT / "config.json").is_file()))
    if finished:
        return RunStart("complete", step, tuple(allowed), summary=summary)
    return RunStart("resume" if step is not None else "fresh", step, tuple(allowed))


def prepare(cfg: ml_collections.ConfigDict, start: RunStart, *, main_process: bool = True,
            loaded: dict[str, str] | None = None) -> Path | None:
    """Act on :func:`inspect`'s decision: move an overwritten run aside (returns where to), log the
    resume-safe changes, record the config in ``run_config.json``, with what the run loads under ``"loaded"``
    (``system.start.run_sources``; not a config key, never compared). Only ``main_process`` writes."""
    workdir = Path(cfg.workdir)
    moved = None
    if main_process:
        workdir.mkdir(parents=True, exist_ok=True)
        if start.overwrite:
            moved = move_run_aside(workdir)
            log.warning("overwrite: the run that was in %s is now in %s", workdir, moved)
        if start.mode != "complete":
            write_json(workdir / RUN_CONFIG, {**cfg.to_dict(), **({"loaded": loaded} if loaded else {})})
    for change in start.changes:
        log.warning("resume: %s (resume-safe)", change)
    if any(c.startswith("train.max_steps:") for c in start.changes):
        log.warning("resume: the learning-rate schedule now spans train.max_steps=%d steps", cfg.train.max_steps)
    return moved


def move_run_aside(workdir: Path) -> Path:
    """Rename the run's files into ``workdir/previous/<time>/``; journaled (see :func:`finish_interrupted_moves`)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = workdir / PREVIOUS / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = workdir / PREVIOUS / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    names = [name for name in RUN_FILES if (workdir / name).exists()]
    write_json(dest / MOVING, {"names": names})
    _move(workdir, dest, names)
    return dest


def _move(workdir: Path, dest: Path, names: list[str]) -> None:
    for name in names:
        if (workdir / name).exists() and not (dest / name).exists():
            os.replace(workdir / name, dest / name)
    (dest / MOVING).unlink()


def finish_interrupted_moves(workdir: Path) -> None:
    """Complete a move into ``previous/`` that a kill cut short, so no start ever sees half a run."""
    from poer_jax.system.multihost import barrier, is_main_process

    prev = workdir / PREVIOUS
    journals = sorted(prev.glob(f"*/{MOVING}")) if prev.is_dir() else []
    if journals and is_main_process():
        for journal in journals:
            data = read_json(journal) or {"names": list(RUN_FILES)}
            log.warning("finishing the move of an old run into %s (it was interrupted)", journal.parent)
            _move(workdir, journal.parent, [n for n in data.get("names", []) if n in RUN_FILES])
    barrier("poer_jax.finish_interrupted_moves")  # every process, journal or not: none may read half a move


def write_summary(workdir: str | os.PathLike[str], summary: dict[str, Any]) -> None:
    """``summary.json``, written last: its presence (with the final step) marks a finished run."""
    write_json(Path(workdir) / SUMMARY, summary)
