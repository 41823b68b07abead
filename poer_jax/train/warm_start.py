"""Supervised warm start: maximise log pi(solution | prompt) before RL (used by the toy demo).

Loss = -sum_t log pi(y_t | x, y_<t) / #target tokens over a batch of (prompt x, target y) pairs, log-probs
in sequence chunks (never a [B, T, V] array), Adam with a constant learning rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from poer_jax.model.qwen import Params
from poer_jax.rl.logprobs import token_logprobs


def _batch(prompts: Sequence[np.ndarray], targets: Sequence[np.ndarray], rows: np.ndarray, pad_id: int,
           width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens = np.full((len(rows), width), pad_id, np.int32)
    attn = np.zeros((len(rows), width), bool)
    loss = np.zeros((len(rows), width), bool)
    for b, r in enumerate(rows):
        seq = np.concatenate([prompts[r], targets[r]])[:width]
        tokens[b, : seq.size] = seq
        attn[b, : seq.size] = True
        loss[b, prompts[r].size: seq.size] = True
    return tokens, attn, loss


def supervised_warm_start(
    params: Params, cfg: Any, prompts: Sequence[np.ndarray], targets: Sequence[np.ndarray], *, steps: int,
    learning_rate: float, batch_size: int, seed: int, pad_id: int, chunk_size: int = 256,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Params, list[float]]:
    """``steps`` Adam steps on random mini-batches; returns (params, per-step losses).

    ``progress(done, loss)`` is called about 50 times over the run (each call waits for that step's loss,
    so the device runs at most ``steps / 50`` steps ahead of the host)."""
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"warm start: {len(prompts)} prompts and {len(targets)} targets")
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))
    opt_state = opt.init(params)
    width = max(p.size + t.size for p, t in zip(prompts, targets, strict=True))
    width = -(-width // 16) * 16

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params: Params, opt_state: Any, tokens: jax.Array, attn: jax.Array, loss_mask: jax.Array):
        def loss_fn(p: Params) -> jax.Array:
            lp, _ = token_logprobs(p, cfg, tokens, attn, chunk_size=chunk_size)
            return -jnp.sum(jnp.where(loss_mask, lp, 0.0)) / jnp.maximum(loss_mask.sum(), 1)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    every = max(1, steps // 50)
    for i in range(steps):
        rows = rng.choice(len(prompts), size=min(batch_size, len(prompts)), replace=False)
        params, opt_state, loss = step(params, opt_state, *_batch(prompts, targets, rows, pad_id, width))
        losses.append(loss)
        if progress is not None and ((i + 1) % every == 0 or i + 1 == steps):
            progress(i + 1, float(loss))
    return params, [float(x) for x in jax.device_get(losses)]
