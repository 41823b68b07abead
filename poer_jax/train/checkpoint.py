"""Training checkpoints: an Orbax ``CheckpointManager`` holding the train state, the POER cache pool and JSON.

One checkpoint is a step directory ``<directory>/<step>/`` with three Orbax items:

  state  the train-state pytree (params, optimizer state, step counter, PRNG key data); jax arrays, possibly
         sharded, restored with the target shardings of ``abstract_state``
  pool   the cache pool C (paper Sec. 3.1, Eq. 1): a dict of its arrays, host numpy
         (:func:`poer.cache_pool.to_state_dict`) or jax arrays, possibly sharded over several processes;
         absent when the run has no pool
  extra  a JSON object: data-iterator position (:meth:`EpochIterator.get_state`), host RNG state, config...
  integrity  JSON: per-leaf checksums of state and pool (the uint32 words of each leaf summed mod 2**32),
         computed on device when saving

Crash safety comes from Orbax: a step is written into ``<step>.orbax-checkpoint-tmp`` and renamed into place
only after every item is on disk (on a local filesystem; on GCS a commit-success file plays that role), so a
process killed mid-save leaves a tmp directory that the step listing ignores and the next ``Checkpointer``
on the directory deletes. Old steps are deleted only after the new one is committed, so ``keep=1`` is safe.

Restoring verifies what it read: every array was readable, has the template's shape, the train state is
finite and every leaf's checksum matches the one saved (this catches garbled bytes that still decode to
finite numbers). :meth:`Checkpointer.restore_latest_intact` walks back from the newest step to the first
that passes, moves the broken ones into ``broken_checkpoints/`` next to the directory (so their step
numbers can be saved again, and nothing is deleted) and warns naming each with the reason. Orbax and
TensorStore report unreadable files as ``FileNotFoundError``, ``ValueError`` or a bare ``Exception``, so a
step's restore catches ``Exception``. A failed restore leaves nothing running behind it (orbax's event loop
is drained before it closes, :mod:`poer_jax.train.orbax_loops`), so the fallback prints its warning and no
tracebacks.

Non-finite train states are refused by raising :class:`NonFiniteCheckpointError` (a ``ValueError``) that
names the offending leaves; nothing is written. Raising rather than skipping with a warning is deliberate: a
NaN in the params means the run is broken, and silently continuing would make the last good checkpoint grow
stale without anybody noticing. The pool is exempt: its ``last_reward`` is NaN by design for rows inserted
without a reward.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from poer_jax.poer.cache_pool import ARRAY_FIELDS, CachePool
from poer_jax.train.orbax_loops import draining_orbax_loops

log = logging.getLogger(__name__)

ITEM_NAMES = ("state", "pool", "extra", "integrity")


class NonFiniteCheckpointError(ValueError):
    """The train state handed to :meth:`Checkpointer.save` holds NaN or inf values."""


class BrokenCheckpointError(ValueError):
    """A checkpoint step that cannot be used: a file missing or unreadable, a shape, checksum or non-finite
    value that does not match what was saved."""


def _is_inexact(x: Any) -> bool:
    if isinstance(x, float):
        return True
    dtype = getattr(x, "dtype", None)
    # PRNG key arrays have an extended dtype that jnp.issubdtype treats as non-numeric.
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


@jax.jit
def _leaves_finite(leaves: list[Any]) -> jax.Array:
    """bool[len(leaves)]: all(isfinite(leaf)) per leaf; one fused reduction per leaf, one host transfer."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> list[str]:
    """Key paths (``jax.tree_util.keystr``) of the floating-point leaves of ``tree`` holding NaN or inf."""
    flat = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] if _is_inexact(x)]
    if not flat:
        return []
    finite = np.asarray(jax.device_get(_leaves_finite([x for _, x in flat])))
    return [jax.tree_util.keystr(path) for (path, _), ok in zip(flat, finite) if not ok]


def _words(x: jax.Array) -> jax.Array:
    """The leaf's bits as uint32 words (PRNG keys by their key data; 8-byte types as two words)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    size = jnp.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size < 4:
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes -> [..., 2]


@jax.jit
def _group_checksums(leaves: list[Any]) -> jax.Array:
    """uint32[len(leaves)]: each leaf's words summed mod 2**32 (order-free, so how a leaf is sharded does
    not matter)."""
    return jnp.stack([jnp.sum(_words(jnp.asarray(x)), dtype=jnp.uint32) for x in leaves])


def checksums(tree: Any) -> list[int]:
    """Per-leaf checksums of ``tree`` (flattening order): one jitted reduction per set of devices the
    leaves live on (one compile, not one per leaf; a jit cannot mix device sets), one host transfer."""
    leaves = jax.tree.leaves(tree)
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        committed = isinstance(x, jax.Array) and getattr(x, "committed", True)
        key = frozenset(d.id for d in x.sharding.device_set) if committed else None
        groups.setdefault(key, []).append(i)
    if None in groups and len(groups) > 1:  # host arrays join any group
        host = groups.pop(None)
        groups[next(iter(groups))] += host
    indices = list(groups.values())
    sums = jax.device_get([_group_checksums([leaves[i] for i in idx]) for idx in indices])
    out = [0] * len(leaves)
    for idx, values in zip(indices, sums, strict=True):
        for i, v in zip(idx, values, strict=True):
            out[i] = int(v)
    return out


def _as_abstract(x: Any) -> Any:
    """Restore target for one template leaf: jax arrays become ShapeDtypeStructs carrying their sharding."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _check_pool(pool_state: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(pool_state, Mapping):
        raise TypeError(f"checkpoint: pool_state must be a dict of arrays, got {type(pool_state).__name__}")
    out = {}
    for key, value in pool_state.items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint: pool_state keys must be str, got {key!r}")
        out[key] = value if isinstance(value, jax.Array) else np.asarray(value)  # jax arrays: saved per shard
    return out


def _check_extra(extra: Mapping[str, Any]) -> None:
    if not isinstance(extra, Mapping):
        raise TypeError(f"checkpoint: extra must be a dict, got {type(extra).__name__}")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint: extra is not JSON-serialisable: {e}") from e


class Checkpointer:
    """Keep the last ``keep`` checkpoints of a run in ``directory``, saving every ``save_interval_steps``.

    ``async_save`` (default True) returns from :meth:`save` once the arrays are copied to host memory and
    writes them in a background thread, so donated device buffers may be reused right after ``save``
    returns; call :meth:`wait` before reading the directory and :meth:`close` at the end of the run.
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int, save_interval_steps: int = 1, *,
                 async_save: bool = True, broken_directory: str | os.PathLike[str] | None = None) -> None:
        if int(keep) < 1:
            raise ValueError(f"checkpoint: keep must be >= 1, got {keep}")
        if int(save_interval_steps) < 1:
            raise ValueError(f"checkpoint: save_interval_steps must be >= 1, got {save_interval_steps}")
        self.keep = int(keep)
        self.save_interval_steps = int(save_interval_steps)
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(self.save_interval_steps),
            preservation_policy=ocp.checkpoint_managers.LatestN(self.keep),
            # A tmp dir left by a killed save would make the next save of that step fail.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                                           item_names=ITEM_NAMES)
        d = Path(self.directory)
        self.broken_directory = Path(broken_directory) if broken_directory else d.parent / f"broken_{d.name}"

    @property
    def directory(self) -> str:
        return os.fspath(self._mngr.directory)

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (plus a save still in flight when ``async_save``; :meth:`wait` first)."""
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """Newest committed step, or None; incomplete ``*.orbax-checkpoint-tmp`` directories never count."""
        return self._mngr.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` without ``force`` would write ``step`` (interval hit, step newer than latest)."""
        return self._mngr.should_save(int(step))

    def save(self, step: int, train_state: Any, pool_state: Mapping[str, Any] | None,
             extra: Mapping[str, Any], force: bool = False) -> bool:
        """Write checkpoint ``step``; returns False (writing nothing) when the interval says not to save.

        ``force`` saves off-interval (e.g. the final step); saving a step that already exists raises.
        Raises :class:`NonFiniteCheckpointError` when a floating-point leaf of ``train_state`` is NaN/inf.
        The finiteness check is one jitted reduction and one small host transfer, done only on steps that
        are actually saved.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"checkpoint: step must be >= 0, got {step}")
        if not force and not self._mngr.should_save(step):
            return False
        _check_extra(extra)
        pool = None if pool_state is None else _check_pool(pool_state)
        bad = nonfinite_leaves(train_state)
        if bad:
            shown = ", ".join(bad[:8]) + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else "")
            raise NonFiniteCheckpointError(
                f"checkpoint: refusing to save step {step} to {self.directory}: non-finite values in "
                f"train_state leaves {shown}")
        integrity = {"state": checksums(train_state), "pool": checksums(pool) if pool is not None else []}
        items: dict[str, Any] = {"state": ocp.args.StandardSave(train_state), "extra": ocp.args.JsonSave(dict(extra)),
                                 "integrity": ocp.args.JsonSave(integrity)}
        if pool is not None:
            items["pool"] = ocp.args.StandardSave(pool)
        saved = bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=force))
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int | None = None, abstract_state: Any = None,
                abstract_pool: Mapping[str, Any] | None = None, *, verify: bool = True
                ) -> tuple[Any, dict[str, Any] | None, dict[str, Any]]:
        """Load ``(train_state, pool_state, extra)`` of ``step`` (default: the latest).

        ``abstract_state`` is the target pytree: ``jax.ShapeDtypeStruct`` leaves (with ``.sharding``) or
        concrete arrays used as templates (their shape, dtype and sharding). Arrays come back placed with
        those shardings, and container types (optax NamedTuple states) come back as in the template. With
        ``abstract_state=None`` the state is restored as stored: NamedTuples become dicts/lists and arrays
        take the shardings recorded at save time, which only works on the same device set; use it for
        inspection, not to resume. ``pool_state`` is None when the checkpoint has no pool; it is a dict of
        numpy arrays, or, given ``abstract_pool`` (a template dict, as for ``abstract_state``), of arrays placed
        like the template's (needed on several processes, where no process holds the whole pool).

        ``verify`` checks shapes against the template, finiteness and the saved checksums, raising
        :class:`BrokenCheckpointError`; unreadable items raise what Orbax raises.
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"checkpoint: no checkpoint in {self.directory}")
            step = steps[-1]
        step = int(step)
        if step not in steps:
            raise FileNotFoundError(f"checkpoint: no step {step} in {self.directory}; available steps {steps}")
        target = None if abstract_state is None else jax.tree.map(_as_abstract, abstract_state)
        step_dir = Path(self.directory) / str(step)
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(target), "extra": ocp.args.JsonRestore()}
        has_pool = (step_dir / "pool").exists()
        if has_pool:
            items["pool"] = ocp.args.StandardRestore(
                None if abstract_pool is None else jax.tree.map(_as_abstract, dict(abstract_pool)))
        has_integrity = (step_dir / "integrity").exists()  # checkpoints written before it existed lack it
        if has_integrity:
            items["integrity"] = ocp.args.JsonRestore()
        try:
            with draining_orbax_loops():  # a failed read leaves no orphaned reads to print tracebacks later
                out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint: cannot restore step {step} from {self.directory} into the given "
                             f"abstract_state: {e}") from e
        pool = None
        if has_pool:
            restored = dict(out["pool"])
            pool = restored if abstract_pool is not None else {k: np.asarray(v) for k, v in restored.items()}
        if verify:
            self._verify(step, out["state"], target, pool, out["integrity"] if has_integrity else None)
        return out["state"], pool, dict(out["extra"])

    def _verify(self, step: int, state: Any, target: Any, pool: Mapping[str, Any] | None,
                integrity: Mapping[str, Any] | None) -> None:
        where = f"{self.directory}/{step}"
        if target is not None:
            for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(target),
                                         strict=True):
                if tuple(np.shape(got)) != tuple(np.shape(want)):
                    raise BrokenCheckpointError(f"{where}: leaf {jax.tree_util.keystr(path)} has shape "
                                                f"{np.shape(got)}, the run needs {np.shape(want)}")
        bad = nonfinite_leaves(state)
        if bad:
            raise BrokenCheckpointError(f"{where}: non-finite values in {', '.join(bad[:4])} (never saved so: the "
                                        "files were altered)")
        if integrity is None:
            return
        for name, tree in (("state", state), ("pool", pool)):
            saved = list(integrity.get(name, []))
            if tree is None or not saved:
                continue
            got = checksums(tree)
            if sorted(got) != sorted(saved):  # order-free: restoring without a template reorders containers
                paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
                wrong = [p for p, c in zip(paths, got, strict=True) if c not in saved]
                raise BrokenCheckpointError(f"{where}: {name} leaves {', '.join(wrong[:4]) or '?'} do not match the "
                                            "checksums saved with them (garbled files)")

    def restore_latest_intact(self, abstract_state: Any, abstract_pool: Mapping[str, Any] | None = None, *,
                              agree: Callable[[bool], bool] = bool, move_broken: bool = True
                              ) -> tuple[int, Any, dict[str, Any] | None, dict[str, Any]]:
        """``(step, train_state, pool_state, extra)`` of the newest step that restores and verifies.

        Newer steps that fail are named in a warning with the reason and, with ``move_broken`` (a run that
        continues; not a reader such as the evaluator), moved into :attr:`broken_directory` so the run can
        save those step numbers again. ``agree(ok)`` makes every process take the same
        decision on a multi-host run (default: this process alone). Raises :class:`BrokenCheckpointError`
        listing every step's reason when none is intact, or FileNotFoundError when there is no checkpoint;
        then nothing is moved.
        """
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"checkpoint: no checkpoint in {self.directory}")
        reasons: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                state, pool, extra = self.restore(step, abstract_state, abstract_pool)
                error = None
            except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise bare Exception for unreadable data
                text = (str(e).splitlines() or [""])[0].split(" See full TensorStore details")[0]
                error = f"{type(e).__name__}: {text[:240]}"
            if agree(error is None):
                for broken, reason in reasons:
                    self._quarantine(broken, reason, step, move_broken)
                return step, state, pool, extra
            reasons.append((step, error or "broken on another process"))
        listed = "\n".join(f"  step {s}: {r}" for s, r in reasons)
        raise BrokenCheckpointError(f"checkpoint: no intact checkpoint in {self.directory}:\n{listed}")

    def _quarantine(self, step: int, reason: str, fallback: int, move: bool) -> None:
        if not move:
            log.warning("checkpoint: step %d in %s is broken (%s); using step %d instead", step, self.directory,
                        reason, fallback)
            return
        log.warning("checkpoint: step %d in %s is broken (%s); resuming from step %d instead. The broken step is "
                    "kept in %s", step, self.directory, reason, fallback, self.broken_directory)
        if jax.process_index() == 0:
            self.broken_directory.mkdir(parents=True, exist_ok=True)
            dest = self.broken_directory / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(Path(self.directory) / str(step), dest)
            (dest / "BROKEN.txt").write_text(reason + "\n")
        from poer_jax.system.multihost import barrier

        barrier("poer_jax.checkpoint_quarantine")
        self._mngr.reload()

    def restore_extra(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON ``extra`` of ``step`` (default: the latest), e.g. the run's config."""
        self.wait()
        steps = self.all_steps()
        if not steps or (step is not None and int(step) not in steps):
            raise FileNotFoundError(f"checkpoint: no step {step if step is not None else ''} in {self.directory}")
        step = steps[-1] if step is None else int(step)
        with draining_orbax_loops():
            out = self._mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        return dict(out["extra"])

    def wait(self) -> None:
        """Block until in-flight saves (and the deletions of old steps they trigger) are on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pool_items(pool: CachePool) -> dict[str, Any]:
    """The pool as checkpoint items: its (possibly multi-host sharded) arrays and its pad id."""
    return {**{f: getattr(pool, f) for f in ARRAY_FIELDS}, "pad_id": np.asarray(pool.pad_id, np.int32)}


def pool_from_items(items: dict[str, Any]) -> CachePool:
    """The cache pool back from ``pool_items``."""
    return CachePool(**{f: items[f] for f in ARRAY_FIELDS}, pad_id=int(np.asarray(items["pad_id"])))
