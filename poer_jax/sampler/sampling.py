"""Token sampling: greedy, temperature, top-k, top-p, returning both log-probs the trainer needs.

For a row of float32 logits l [V] and ``SamplingParams(temperature=T, top_k=k, top_p=p)``:

  z = l / T                             (T = 0 means greedy: z = l, token = argmax l)
  policy_logprob(x)   = log_softmax(z)[x]   (full vocabulary, no truncation: what a TRL-style trainer
                                           computes as log pi_theta(x) at temperature T)
  keep                = top-k set of z (when k > 0), then the top-p nucleus of the renormalised
                        distribution over what is left (when p < 1): token i is kept iff the mass of the
                        tokens strictly more likely than i is < p (HF / vLLM convention; the most likely
                        token is always kept)
  sampling_logprob(x) = z_x - logsumexp(z[keep])         (log-prob under the distribution actually
                                                          sampled; 0 for greedy, a point mass)
  x                   = argmax(z[keep] + Gumbel noise)   (Gumbel-max: an exact draw from softmax(z[keep]))

This is the sampling step of the rollout o = a_k^[0:-m] || pi_theta(. | q_k, a_k^[0:-m]) (paper Eq. 3).

Top-p without a sort: the nucleus is {i : p_i >= tau*} where tau* is the smallest float t with
f(t) = sum_{p_j > t} p_j < p. f is non-increasing in t and non-negative float32 values order like their bit
patterns, so tau* is found exactly by an integer search over the bit pattern of t in [0, max_j p_j];
each round evaluates ``_SEARCH_WAYS`` = 16 thresholds in one pass over the vocabulary, and 8 rounds always
suffice for float32, so the probabilities are read ~8 times instead of sorting 150k entries per row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG_INF = -1e30
_SEARCH_WAYS = 16  # thresholds evaluated per pass of the top-p search


def _search_rounds(ways: int, interval: int = 0x40000000) -> int:
    """Rounds that shrink any bit interval [0, bits(2.0)] to width 1: a round leaves at most
    max(step, I - ways * step) with step = max(I // (ways + 1), 1), and ends the search once I <= ways + 1."""
    rounds = 0
    while interval > 1:
        step = max(interval // (ways + 1), 1)
        interval = max(step, interval - ways * step) if ways * step < interval else 1
        rounds += 1
    return rounds


# A fixed trip count: XLA:GPU syncs with the host on every iteration of a data-dependent while loop.
_SEARCH_ROUNDS = _search_rounds(_SEARCH_WAYS)


class SamplingConfigError(ValueError):
    """Invalid sampling parameters."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn. Hashable: it is a static argument of the jitted sampler.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = off).
    top_p: keep the smallest nucleus with mass >= top_p (1 = off). Applied after top-k, as in HF.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise SamplingConfigError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise SamplingConfigError(f"SamplingParams.top_k must be a non-negative int, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise SamplingConfigError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def policy_temperature(self) -> float:
        """Temperature of ``policy_logprobs`` (1 for greedy)."""
        return 1.0 if self.greedy else float(self.temperature)


def top_p_threshold(probs: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """tau* [B]: the nucleus of each row of ``probs`` [B, V] is exactly ``probs >= tau*[:, None]``.

    tau* = min{t : sum_{p_j > t} p_j < top_p}, found by a W-ary search over the int32 bit pattern of t
    (monotone for t >= 0). Invariant: f(lo) >= top_p > f(hi), with f(0) = total mass and f(max p) = 0.
    """
    probs = probs.astype(jnp.float32)
    B = probs.shape[0]
    hi0 = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32)
    lo0 = jnp.zeros((B,), jnp.int32)
    ways = jnp.arange(1, _SEARCH_WAYS + 1, dtype=jnp.int32)

    def body(_: jax.Array, c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = c  # once hi - lo == 1 every candidate is hi and the round changes nothing
        step = jnp.maximum((hi - lo) // (_SEARCH_WAYS + 1), 1)
        cand = jnp.minimum(lo[:, None] + step[:, None] * ways, hi[:, None])  # [B, W], no int32 overflow
        thr = jax.lax.bitcast_convert_type(cand, jnp.float32)
        # One variadic reduction with W accumulators: a single pass over probs whose elementwise inputs fuse
        # into it; a [B, W, V] comparison would be materialised (600 MB at B=64, V=152k) by some backends.
        parts = tuple(jnp.where(probs > thr[:, w : w + 1], probs, 0.0) for w in range(_SEARCH_WAYS))
        zeros = tuple(jnp.float32(0) for _ in parts)
        mass = jnp.stack(jax.lax.reduce(parts, zeros, _sum_tuples, (1,)), axis=-1)  # [B, W]
        below = mass < top_p  # a suffix of the candidates, since mass is non-increasing in the threshold
        hi = jnp.min(jnp.where(below, cand, hi[:, None]), axis=-1)
        lo = jnp.max(jnp.where(below, lo[:, None], cand), axis=-1)
        return lo, hi

    _, hi = jax.lax.fori_loop(0, _SEARCH_ROUNDS, body, (lo0, hi0))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)


def _sum_tuples(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` as int32: the first index of the row maximum (of the first NaN, if any).

    Two plain reductions (max, then the least index that attains it) instead of one variadic (value, index)
    reduction, which XLA:CPU does not vectorise: a greedy decode step's argmax over a 32k vocabulary (B = 8)
    took 1.2 ms that way (docs/benchmarks.md)."""
    m = jnp.max(x, axis=-1, keepdims=True)  # NaN if the row holds one: then only NaNs match below
    hit = (x == m) | jnp.isnan(x)
    idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(hit, idx, x.shape[-1]), axis=-1)


def _pick(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


def _gumbel(keys: jax.Array, n: int) -> jax.Array:
    """Per-row Gumbel noise [B, n]; row b depends only on keys[b] (not on the batch size or padding)."""
    return jax.vmap(lambda k: jax.random.gumbel(k, (n,), jnp.float32))(keys)


def sample_tokens(
    logits: jax.Array, keys: jax.Array, params: SamplingParams
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one token per row. logits [B, V] (float32), keys [B] typed PRNG keys (one per row).

    Returns (tokens int32 [B], sampling_logprobs f32 [B], policy_logprobs f32 [B]); see the module docstring.
    """
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    z = logits if params.greedy else logits / params.temperature
    log_z = jax.nn.log_softmax(z, axis=-1)
    if params.greedy:
        tok = argmax(logits)
        return tok, jnp.zeros((B,), jnp.float32), _pick(log_z, tok)

    k = min(int(params.top_k), V)
    if k > 0 and k < V:
        vals, idx = jax.lax.top_k(z, k)  # sorted descending
        if params.top_p < 1.0:
            p = jax.nn.softmax(vals, axis=-1)
            keep = (jnp.cumsum(p, axis=-1) - p) < params.top_p
            keep = keep.at[:, 0].set(True)
            vals = jnp.where(keep, vals, _NEG_INF)
        choice = argmax(vals + _gumbel(keys, k))
        tok = _pick(idx, choice).astype(jnp.int32)
        lp = _pick(jax.nn.log_softmax(vals, axis=-1), choice)
        return tok, lp, _pick(log_z, tok)

    if params.top_p < 1.0:
        probs = jnp.exp(log_z)
        masked = jnp.where(probs >= top_p_threshold(probs, params.top_p)[:, None], z, _NEG_INF)
        tok = argmax(masked + _gumbel(keys, V))
        lp = _pick(masked, tok) - jax.nn.logsumexp(masked, axis=-1)
        return tok, lp, _pick(log_z, tok)

    tok = argmax(z + _gumbel(keys, V))
    lp = _pick(log_z, tok)
    return tok, lp, lp


# ---- per-sample PRNG keys -------------------------------------------------------------------------------
_KEY_IMPL = "threefry2x32"  # per-sample key data [.., 2] uint32 lives in the decode state


def as_key(key: jax.Array) -> jax.Array:
    """A typed threefry key from a typed key (``jax.random.key``) or raw key data (``jax.random.PRNGKey``)."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != (2,):
            raise SamplingConfigError(
                f"sampler key: expected a threefry key or uint32[2] key data, got {key.shape}"
            )
        return jax.random.wrap_key_data(key.astype(jnp.uint32), impl=_KEY_IMPL)
    if key.shape != () or jax.random.key_data(key).shape != (2,):
        raise SamplingConfigError(
            f"sampler key: expected one threefry2x32 key, got shape {key.shape} of {key.dtype}"
        )
    return key


def sample_keys(prompt_keys: jax.Array, num_samples: int) -> jax.Array:
    """Key data [N, G, 2]: sample i of prompt n uses fold_in(prompt_keys[n], i)."""
    f = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))
    return jax.random.key_data(f(prompt_keys, jnp.arange(num_samples, dtype=jnp.uint32)))


def token_keys(key_data: jax.Array, index: jax.Array) -> jax.Array:
    """Typed keys [B] for token ``index[b]`` of each sample: fold_in(sample_key, index)."""
    keys = jax.random.wrap_key_data(key_data, impl=_KEY_IMPL)
    return jax.vmap(jax.random.fold_in)(keys, index.astype(jnp.uint32))
