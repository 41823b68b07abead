"""DAPO dynamic sampling (host side, numpy): keep only groups whose rewards differ.

A group whose G rewards are all equal has zero group-relative advantage (Eq. 6) and adds no policy
gradient; DAPO drops such groups and generates more until the batch holds ``target_groups`` groups,
failing after ``max_attempts`` generation batches (verl: ``max_num_gen_batches``, default 10).

This runs between generation and the update, on host arrays; it is not meant to be jitted.

Usage::

    sampler = DynamicSampler(target_groups=64, group_size=6, max_attempts=10)
    while not sampler.add(batch, rewards):   # batch: dict of numpy arrays, rewards [num_groups, G]
        batch, rewards = generate_more()
    batch, rewards = sampler.result()        # exactly 64 groups

or ``select_groups(generate_more, target_groups=64, group_size=6)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np


class DynamicSamplingError(RuntimeError):
    """Too few groups with reward spread after the allowed number of generation batches."""


def groups_with_spread(rewards: np.ndarray) -> np.ndarray:
    """Bool [num_groups]: True where the group's rewards are not all equal (std > 0).

    Tested as max != min rather than std > 0: the floating-point std of equal values can be a tiny
    nonzero number. NaN rewards are an error. A group of one response never has spread (verl keeps such
    groups; they carry zero advantage under Eq. 6, so here they are dropped).
    """
    r = np.asarray(rewards)
    if r.ndim != 2:
        raise ValueError(f"dynamic_sampling.py: rewards must be [num_groups, G], got shape {r.shape}")
    if r.size and np.isnan(r).any():
        bad = np.unique(np.nonzero(np.isnan(r))[0]).tolist()
        raise ValueError(f"dynamic_sampling.py: NaN rewards in group rows {bad}")
    if r.shape[1] == 0:
        return np.zeros(r.shape[0], bool)
    return r.max(axis=1) != r.min(axis=1)


class DynamicSampler:
    """Accumulates groups with reward spread over generation batches until ``target_groups`` are kept.

    Each array of a batch dict has a leading axis of either ``num_groups`` (per-group data, e.g. prompt
    ids) or ``num_groups * G`` (per-response data, group-major: rows g*G .. g*G+G-1 are group g); both
    are filtered by the same group mask. Keys and trailing shapes must be the same in every batch.
    """

    def __init__(self, target_groups: int, group_size: int, max_attempts: int = 10) -> None:
        if target_groups < 1:
            raise ValueError(f"dynamic_sampling.py: target_groups must be >= 1, got {target_groups}")
        if group_size < 2:
            raise ValueError(
                f"dynamic_sampling.py: group_size={group_size}: a group of one response never has reward "
                "spread; disable dynamic sampling for G = 1"
            )
        self.target_groups = target_groups
        self.group_size = group_size
        # <= 0 means unlimited, as verl's max_num_gen_batches.
        self.max_attempts = max_attempts
        self.reset()

    def reset(self) -> None:
        self.attempts = 0
        self.groups_seen = 0
        self._rewards: list[np.ndarray] = []
        self._parts: list[dict[str, np.ndarray]] = []
        self._per_sample: dict[str, bool] = {}
        self._num_kept = 0

    @property
    def num_kept(self) -> int:
        return self._num_kept

    @property
    def done(self) -> bool:
        return self._num_kept >= self.target_groups

    def _select(self, batch: Mapping[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
        num_groups = keep.shape[0]
        if self._parts and set(batch) != set(self._parts[0]):
            raise ValueError(
                f"dynamic_sampling.py: batch {self.attempts} has keys {sorted(batch)}, "
                f"earlier batches had {sorted(self._parts[0])}"
            )
        out = {}
        kinds = {}
        for key, value in batch.items():
            arr = np.asarray(value)
            if arr.ndim >= 1 and arr.shape[0] == num_groups:
                out[key], kinds[key] = arr[keep], False
            elif arr.ndim >= 1 and arr.shape[0] == num_groups * self.group_size:
                out[key], kinds[key] = arr[np.repeat(keep, self.group_size)], True
            else:
                raise ValueError(
                    f"dynamic_sampling.py: batch[{key!r}] has shape {arr.shape}; its leading axis must be "
                    f"num_groups={num_groups} or num_groups*G={num_groups * self.group_size}"
                )
            if self._parts and kinds[key] != self._per_sample[key]:
                raise ValueError(
                    f"dynamic_sampling.py: batch[{key!r}] is per-{'response' if kinds[key] else 'group'} "
                    f"in batch {self.attempts} but was "
                    f"per-{'response' if self._per_sample[key] else 'group'} before"
                )
            if self._parts and out[key].shape[1:] != self._parts[0][key].shape[1:]:
                raise ValueError(
                    f"dynamic_sampling.py: batch[{key!r}] trailing shape {out[key].shape[1:]} differs from "
                    f"earlier batches' {self._parts[0][key].shape[1:]}"
                )
        if not self._parts:
            self._per_sample = kinds
        return out

    def add(self, batch: Mapping[str, np.ndarray], rewards: np.ndarray) -> bool:
        """Add one generation batch; returns True once ``target_groups`` groups have been kept.

        Raises DynamicSamplingError when this is attempt number ``max_attempts`` and the target is still
        not reached.
        """
        r = np.asarray(rewards)
        if r.ndim != 2 or r.shape[1] != self.group_size:
            raise ValueError(
                f"dynamic_sampling.py: rewards must be [num_groups, {self.group_size}], got shape {r.shape}"
            )
        if self.done:
            raise RuntimeError("dynamic_sampling.py: add() after the target was reached; call result()")
        keep = groups_with_spread(r)
        part = self._select(batch, keep)
        self.attempts += 1
        self.groups_seen += r.shape[0]
        self._parts.append(part)
        self._rewards.append(r[keep])
        self._num_kept += int(keep.sum())
        if not self.done and 0 < self.max_attempts <= self.attempts:
            raise DynamicSamplingError(
                f"dynamic_sampling.py: only {self._num_kept}/{self.target_groups} groups with reward spread "
                f"after {self.attempts} generation batches ({self.groups_seen} groups seen, "
                f"max_attempts={self.max_attempts}); the data may be too easy or too hard for the policy"
            )
        return self.done

    def result(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(batch dict, rewards [target_groups, G]) of the first ``target_groups`` kept groups."""
        if not self.done:
            raise RuntimeError(
                f"dynamic_sampling.py: result() with {self._num_kept}/{self.target_groups} groups kept"
            )
        n = self.target_groups
        rewards = np.concatenate(self._rewards, axis=0)[:n]
        batch = {}
        for key in self._parts[0]:
            arr = np.concatenate([p[key] for p in self._parts], axis=0)
            batch[key] = arr[: n * self.group_size] if self._per_sample[key] else arr[:n]
        return batch, rewards

    def metrics(self) -> dict[str, float]:
        """Host-side counters: generation batches used and the fraction of groups kept."""
        return {
            "dynamic_sampling/attempts": float(self.attempts),
            "dynamic_sampling/kept_fraction": self._num_kept / max(self.groups_seen, 1),
        }


def select_groups(
    generate: Callable[[], tuple[Mapping[str, np.ndarray], np.ndarray]],
    *,
    target_groups: int,
    group_size: int,
    max_attempts: int = 10,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, float]]:
    """Call ``generate() -> (batch, rewards)`` until ``target_groups`` groups with spread are kept.

    Returns (batch, rewards [target_groups, G], metrics); raises DynamicSamplingError after
    ``max_attempts`` batches that were not enough.
    """
    sampler = DynamicSampler(target_groups, group_size, max_attempts)
    while True:
        batch, rewards = generate()
        if sampler.add(batch, rewards):
            out, kept = sampler.result()
            return out, kept, sampler.metrics()
