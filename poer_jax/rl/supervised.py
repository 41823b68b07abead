"""Supervised warm start: maximise log pi(solution | prompt) before RL (used by the toy demo).

Loss = -sum_t log pi(y_t | x, y_<t) / #target tokens over a batch of (prompt x, target y) pairs, log-probs
in sequence chunks (never a [B, T, V] array), Adam with a constant learning rate after an optional linear
warmup, optionally stopped early by a callback (``scripts/warm_start.py`` stops at a validation accuracy).
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
    learning_rate: float, batch_size: int, seed: int, pad_id: int, chunk_size: int = 256, warmup_steps: int = 0,
    micro_batches: int = 1, min_lr_ratio: float = 1.0, callback: Callable[[int, Params], bool] | None = None,
    callback_every: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Params, list[float]]:
    """Up to ``steps`` Adam steps on random mini-batches; returns (params, per-step losses).

    The learning rate rises linearly over ``warmup_steps``, then stays (``min_lr_ratio`` 1) or follows a
    cosine down to ``min_lr_ratio`` x ``learning_rate`` at ``steps`` (a small model's loss stalls at the noise
    floor of a constant rate). ``micro_batches``: the batch's
    gradient is accumulated over that many slices of its rows (one ``lax.scan``), the same update with a
    smaller working set (on a CPU, dense attention over a few rows stays in cache: 2-3x faster).
    ``callback(step, params)`` runs every ``callback_every`` steps (e.g. a validation run) and stops the warm
    start early by returning True; ``params`` are donated to the next step, so a callback must copy them.
    ``progress(done, loss)`` is called about 50 times over the run (each call waits for that step's loss,
    so the device runs at most ``steps / 50`` steps ahead of the host)."""
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"warm start: {len(prompts)} prompts and {len(targets)} targets")
    batch_size = min(batch_size, len(prompts))
    if micro_batches < 1 or batch_size % micro_batches:
        raise ValueError(f"warm start: micro_batches={micro_batches} must divide the batch of {batch_size} rows")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"warm start: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if min_lr_ratio < 1.0:
        lr: Any = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(steps, warmup_steps + 1),
                                                     learning_rate * min_lr_ratio)
    else:
        lr = optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps > 0 else learning_rate
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    opt_state = opt.init(params)
    width = max(p.size + t.size for p, t in zip(prompts, targets, strict=True))
    width = -(-width // 16) * 16

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params: Params, opt_state: Any, tokens: jax.Array, attn: jax.Array, loss_mask: jax.Array):
        def summed_nll(p: Params, mb: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
            lp, _ = token_logprobs(p, cfg, mb[0], mb[1], chunk_size=chunk_size)
            return -jnp.sum(jnp.where(mb[2], lp, 0.0))

        def accumulate(acc: tuple[jax.Array, Params], mb: tuple[jax.Array, jax.Array, jax.Array]):
            nll, g = jax.value_and_grad(summed_nll)(params, mb)
            return (acc[0] + nll, jax.tree.map(jnp.add, acc[1], g)), None

        parts = tuple(x.reshape(micro_batches, -1, x.shape[1]) for x in (tokens, attn, loss_mask))
        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (nll, grads), _ = jax.lax.scan(accumulate, zero, parts)
        count = jnp.maximum(loss_mask.sum(), 1)  # the batch's mean over target tokens, whatever the slicing
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, nll / count

    rng = np.random.default_rng(seed)
    losses = []
    every = max(1, steps // 50)
    for s in range(1, steps + 1):
        rows = rng.choice(len(prompts), size=batch_size, replace=False)
        params, opt_state, loss = step(params, opt_state, *_batch(prompts, targets, rows, pad_id, width))
        losses.append(loss)
        if progress is not None and (s % every == 0 or s == steps):
            progress(s, float(loss))
        if callback is not None and callback_every > 0 and s % callback_every == 0 and callback(s, params):
            break
    return params, [float(x) for x in jax.device_get(losses)]
