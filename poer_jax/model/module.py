"""Flax NNX face of the Qwen decoder.

The arithmetic lives in pure functions (``poer_jax.model.qwen``) so the sampler, the update step and the
sharding rules all work on one plain parameter tree. ``QwenForCausalLM`` wraps that tree as ``nnx.Param``
variables for users who compose NNX modules, use ``nnx.jit`` / ``nnx.grad`` or NNX optimizers;
``.params`` / ``from_params`` convert both ways without copying.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from poer_jax.model.config import QwenConfig
from poer_jax.model.qwen import Params, forward, init_params, logits_from_hidden
from poer_jax.model.weights import export_hf, load_hf


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


class QwenForCausalLM(nnx.Module):
    """Qwen2/Qwen3 causal LM as an NNX module; ``__call__`` returns float32 logits [B, T, V]."""

    def __init__(self, cfg: QwenConfig, *, rngs: nnx.Rngs | None = None, params: Params | None = None):
        if params is None:
            if rngs is None:
                raise ValueError("QwenForCausalLM needs either rngs (random init) or params")
            params = init_params(cfg, rngs.params())
        self.config = cfg
        self.weights = nnx.data(jax.tree.map(nnx.Param, params))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, mesh: Mesh | None = None, **overrides: Any) -> QwenForCausalLM:
        params, cfg = load_hf(model_dir, mesh=mesh, **overrides)
        return cls(cfg, params=params)

    @property
    def params(self) -> Params:
        """The plain parameter tree the functional API (sampler, update step) takes."""
        return jax.tree.map(lambda v: v[...], self.weights, is_leaf=_is_var)

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                      mask: jax.Array | None = None) -> jax.Array:
        return forward(self.params, self.config, tokens, positions, mask)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        params = self.params
        return logits_from_hidden(params, self.config, forward(params, self.config, tokens, positions, mask))

    def save_pretrained(self, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                        dtype: str | None = None) -> Path:
        return export_hf(self.params, self.config, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)
