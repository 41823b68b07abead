"""Training checkpoints: an Orbax ``CheckpointManager`` holding the train state, the POER cache pool and JSON.

One checkpoint is a step directory ``<directory>/<step>/`` with three Orbax items:

  state  the train-state pytree (params, optimizer state, step counter, PRNG key data); jax arrays, possibly
         sharded, restored with the target shardings of ``abstract_state``
  pool   the cache pool C (paper Sec. 3.1, Eq. 1): a dict of its arrays, host numpy
         (:func:`poer.cache_pool.to_state_dict`) or jax arrays, possibly sharded over several processes;
         absent when the run has no pool
  extra  a JSON object: data-iterator position (:meth:`EpochIterator.get_state`), host RNG state, config...

Crash safety comes from Orbax: a step is written into ``<step>.orbax-checkpoint-tmp`` and renamed into place
only after every item is on disk (on a local filesystem; on GCS a commit-success file plays that role), so a
process killed mid-save leaves a tmp directory that the step listing ignores and the next ``Checkpointer``
on the directory deletes. Old steps are deleted only after the new one is committed, so ``keep=1`` is safe.

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
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEM_NAMES = ("state", "pool", "extra")


class NonFiniteCheckpointError(ValueError):
    """The train state handed to :meth:`Checkpointer.save` holds NaN or inf values."""


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
                 async_save: bool = True) -> None:
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
        items: dict[str, Any] = {"state": ocp.args.StandardSave(train_state), "extra": ocp.args.JsonSave(dict(extra))}
        if pool is not None:
            items["pool"] = ocp.args.StandardSave(pool)
        saved = bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=force))
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int | None = None, abstract_state: Any = None,
                abstract_pool: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any] | None, dict[str, Any]]:
        """Load ``(train_state, pool_state, extra)`` of ``step`` (default: the latest).

        ``abstract_state`` is the target pytree: ``jax.ShapeDtypeStruct`` leaves (with ``.sharding``) or
        concrete arrays used as templates (their shape, dtype and sharding). Arrays come back placed with
        those shardings, and container types (optax NamedTuple states) come back as in the template. With
        ``abstract_state=None`` the state is restored as stored: NamedTuples become dicts/lists and arrays
        take the shardings recorded at save time, which only works on the same device set; use it for
        inspection, not to resume. ``pool_state`` is None when the checkpoint has no pool; it is a dict of
        numpy arrays, or, given ``abstract_pool`` (a template dict, as for ``abstract_state``), of arrays placed
        like the template's (needed on several processes, where no process holds the whole pool).
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
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(target), "extra": ocp.args.JsonRestore()}
        has_pool = (self._mngr.directory / str(step) / "pool").exists()
        if has_pool:
            items["pool"] = ocp.args.StandardRestore(
                None if abstract_pool is None else jax.tree.map(_as_abstract, dict(abstract_pool)))
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint: cannot restore step {step} from {self.directory} into the given "
                             f"abstract_state: {e}") from e
        pool = None
        if has_pool:
            restored = dict(out["pool"])
            pool = restored if abstract_pool is not None else {k: np.asarray(v) for k, v in restored.items()}
        return out["state"], pool, dict(out["extra"])

    def restore_extra(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON ``extra`` of ``step`` (default: the latest), e.g. the run's config."""
        self.wait()
        steps = self.all_steps()
        if not steps or (step is not None and int(step) not in steps):
            raise FileNotFoundError(f"checkpoint: no step {step if step is not None else ''} in {self.directory}")
        step = steps[-1] if step is None else int(step)
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
