"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on the model's weight products, as pure functions.

A target product y = x W (W [in, out], frozen) becomes

    y = x W + (alpha / r) * (dropout(x) A) B        A [in, r], B [r, out] trained

(Hu et al. Eq. 3 with PEFT's scaling alpha / r and its dropout on the adapter's input only). A starts as PEFT's
``nn.Linear`` default, Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)); B starts at zero, so
the adapted model starts as the base model exactly. For decoding the adapters are merged once per update:

    W' = W + (alpha / r) A B

``LoraWeight`` carries one product's frozen weight and its adapters through the model's parameter tree: the
model's ``_linear`` (``qwen.py``) runs the base product exactly as for a plain weight and adds ``lora_delta``.
Its leaves keep the stacked ``[num_layers]`` axis, so the layer scan slices them like any weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

# config name -> the product it adapts (PEFT's ``target_modules`` names)
LORA_TARGETS: dict[str, str] = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                                "up": "up_proj", "down": "down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r > 0, alpha (scale alpha / r), targets (keys of ``LORA_TARGETS``), dropout on the adapters' input
    during the update (0 <= p < 1), seed of the adapters' initialisation and dropout masks."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(LORA_TARGETS)
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"lora.rank must be an int >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora.targets must be distinct names among {list(LORA_TARGETS)}, got "
                             f"{list(self.targets)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        """alpha / r, the factor of the adapters' product."""
        return float(self.alpha) / int(self.rank)

    @property
    def products(self) -> tuple[str, ...]:
        """The adapted weights' names in the model's order (q_proj, k_proj, ..., down_proj)."""
        return tuple(p for t, p in LORA_TARGETS.items() if t in self.targets)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """One adapted product: frozen ``base`` [..., in, out], adapters ``a`` [..., in, r] and ``b`` [..., r, out],
    optional dropout ``key`` (uint32 key data [..., 2], one key per layer; None: no dropout), and the static
    ``scale`` (alpha / r) and ``dropout`` rate."""

    base: Any
    a: Any
    b: Any
    key: Any = None
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))


def lora_delta(x: jax.Array, w: LoraWeight, dtype: Any) -> jax.Array:
    """(alpha / r) * (dropout(x) A) B for x [..., in], in the compute ``dtype`` (as the base product), one 2-D
    product per factor over the flattened leading axes. Dropout (inverted: kept inputs scaled by 1 / (1 - p))
    only where ``w.key`` is set, i.e. in the update's forward."""
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1]).astype(dtype)
    if w.key is not None and w.dropout > 0:
        keep = jax.random.bernoulli(jax.random.wrap_key_data(w.key), 1.0 - w.dropout, h.shape)
        h = jnp.where(keep, h / jnp.asarray(1.0 - w.dropout, dtype), jnp.zeros((), dtype))
    d = jnp.dot(jnp.dot(h, w.a.astype(dtype)) * jnp.asarray(w.scale, dtype), w.b.astype(dtype))
    return d.reshape(*lead, w.b.shape[-1])


def merged_weight(base: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale * A B in ``base``'s dtype, the product and sum in float32 at full precision (stacked
    [..., in, out] weights merge layer by layer)."""
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (base.astype(jnp.float32) + scale * delta).astype(base.dtype)


def init_a(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """A [..., in, r] ~ U(-1/sqrt(in), 1/sqrt(in)): PEFT's ``lora_A`` (torch's Kaiming-uniform with a = sqrt(5)
    on the [r, in] weight: bound = sqrt(6 / ((1 + a^2) in)) = 1 / sqrt(in))."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def init_b(shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """B [..., r, out] = 0: the adapted model starts as the base model."""
    return jnp.zeros(shape, dtype)
