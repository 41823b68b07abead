"""The run's data order: a deterministic, resumable, sharded iterator over the training questions.

``EpochIterator`` walks a seeded permutation per epoch in global batches of questions; process p of P
takes rows [p B/P, (p+1) B/P) of each global batch. Its state (epoch, offset) is global, so a resumed
run, even with another process count, sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import jax
import ml_collections
import numpy as np

from poer_jax.system.config import ConfigError


@dataclass(frozen=True)
class Batch:
    """This process's share of one global batch: indices into the tokenised prompts."""

    indices: np.ndarray
    epoch: int
    step: int  # global step counted from the start of training


class EpochIterator:
    """Deterministic, resumable, sharded iterator over question indices.

    Epoch e visits ``rng(seed, e).permutation(num_examples)`` in global batches of ``batch_size``
    questions (the last partial batch of an epoch is dropped); process p of P yields the slice
    [p * B/P, (p+1) * B/P) of each global batch, so the P processes partition it. ``num_epochs=None``
    iterates forever.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        num_epochs: int | None = None,
    ) -> None:
        if batch_size <= 0 or num_examples < batch_size:
            raise ValueError(
                f"need 0 < batch_size <= num_examples, got batch_size={batch_size}, "
                f"num_examples={num_examples}"
            )
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.shuffle, self.num_epochs = shuffle, num_epochs
        self.steps_per_epoch = num_examples // batch_size
        self.epoch, self.offset = 0, 0
        self._perm_epoch, self._perm = -1, np.arange(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                self._perm = np.arange(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    @property
    def step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.offset // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.offset + self.batch_size > self.num_examples:
            self.epoch, self.offset = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        step = self.step
        batch = self._permutation(self.epoch)[self.offset : self.offset + self.batch_size]
        share = self.batch_size // self.process_count
        indices = batch[self.process_index * share : (self.process_index + 1) * share].copy()
        self.offset += self.batch_size
        return Batch(indices=indices, epoch=self.epoch, step=step)

    def get_state(self) -> dict[str, int]:
        """JSON-serialisable position plus what must match on resume."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "shuffle": int(self.shuffle),
        }

    def set_state(self, state: Mapping[str, int]) -> None:
        """Resume at a saved position; the dataset size, batch size, seed and shuffle must match."""
        mine = self.get_state()
        for key in ("seed", "num_examples", "batch_size", "shuffle"):
            if key in state and int(state[key]) != mine[key]:
                raise ValueError(
                    f"iterator state has {key}={state[key]}, this iterator has {mine[key]}: "
                    "resuming would not reproduce the data order"
                )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or offset < 0 or offset % self.batch_size or offset > self.num_examples:
            raise ValueError(f"bad iterator state epoch={epoch}, offset={offset}")
        self.epoch, self.offset = epoch, offset

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("an endless EpochIterator has no length")
        return max(0, self.num_epochs * self.steps_per_epoch - self.step)


def build_iterator(cfg: ml_collections.ConfigDict, num_questions: int) -> EpochIterator:
    """The run's iterator over ``num_questions`` training questions, ``data.questions_per_step`` a step."""
    try:  # each process iterates over its share of every global batch
        return EpochIterator(num_questions, cfg.data.questions_per_step, seed=cfg.seed,
                             process_index=jax.process_index(), process_count=jax.process_count())
    except ValueError as e:
        raise ConfigError(f"config key 'data.questions_per_step': {e}") from e
