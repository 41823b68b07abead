"""The policy optimizer: global-norm clipping, then AdamW on a linear-warmup + cosine-decay learning rate.

    g      <- g * min(1, max_grad_norm / ||g||_2)                            (global-norm clip)
    lr(s)  =  lr * s / warmup_steps                                          for s < warmup_steps
    lr(s)  =  lr_min + (lr - lr_min) * (1 + cos(pi * (s - w) / (S - w))) / 2  for w <= s <= S,  lr_min = r * lr
    theta  <- AdamW(theta, g, lr(s), b1, b2, eps, weight_decay)              (decoupled weight decay)

with w = warmup_steps, S = total_steps, r = min_lr_ratio; the rate stays at lr_min after S. This is
Hugging Face's ``cosine_with_min_lr`` schedule (lr 0 at step 0 when warming up), what open-rs and the
authors' code train with (lr 1e-6, warmup ratio 0.1, min lr ratio 0.1; see reference/peers.md). As in
Hugging Face's Trainer, norms and biases get no weight decay.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters (frozen, hashable). ``max_grad_norm`` None disables clipping.

    For a warmup *ratio* (e.g. open-rs' 0.1) use ``OptimConfig.from_warmup_ratio``.
    """

    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        def bad(field: str, rule: str) -> ValueError:
            return ValueError(f"optim.py: OptimConfig.{field} must be {rule}, got {getattr(self, field)!r}")

        def finite(field: str) -> float:
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise bad(field, "a finite number")
            return float(v)

        if finite("learning_rate") < 0:  # 0 is allowed: a frozen policy (evaluation, restoring shapes)
            raise bad("learning_rate", ">= 0")
        for f in ("b1", "b2"):
            if not 0.0 <= finite(f) < 1.0:
                raise bad(f, "in [0, 1)")
        if finite("eps") <= 0:
            raise bad("eps", "> 0")
        if finite("weight_decay") < 0:
            raise bad("weight_decay", ">= 0")
        if self.max_grad_norm is not None and finite("max_grad_norm") <= 0:
            raise bad("max_grad_norm", "> 0 (or None)")
        for f in ("warmup_steps", "total_steps"):
            if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), int):
                raise bad(f, "an int")
        if self.total_steps < 1:
            raise bad("total_steps", ">= 1")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise bad("warmup_steps", f"in [0, total_steps={self.total_steps}]")
        if not 0.0 <= finite("min_lr_ratio") <= 1.0:
            raise bad("min_lr_ratio", "in [0, 1]")

    @classmethod
    def from_warmup_ratio(cls, warmup_ratio: float, total_steps: int, **kwargs: Any) -> OptimConfig:
        """warmup_steps = ceil(warmup_ratio * total_steps) (Hugging Face's rounding)."""
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"optim.py: warmup_ratio must be in [0, 1], got {warmup_ratio!r}")
        return cls(warmup_steps=math.ceil(warmup_ratio * total_steps), total_steps=total_steps, **kwargs)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """step -> learning rate (see the module docstring)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps,
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """True for the weights that get weight decay: every matrix, not norms or biases (Hugging Face's rule)."""

    def keep(path: tuple[Any, ...], _: Any) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name.endswith("norm") or name.endswith("bias"))

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, its learning-rate schedule). Index the schedule with the number of applied
    updates to get the rate of the next one."""
    schedule = make_schedule(cfg)
    parts = [] if cfg.max_grad_norm is None else [optax.clip_by_global_norm(cfg.max_grad_norm)]
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule
