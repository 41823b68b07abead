"""One step's rollout: POER continuations of cached prefixes (Eq. 3) or full GRPO samples.

POER: for each question k of the step, m ~ U{0..L} is drawn per group (``poer.truncate``), the prompt is
q_k || a_k^[0:-m] and the sampler decodes only the G continuations; the response used for rewards, the
loss and the cache update is o_i = a_k^[0:-m] || continuation_i. Full: the prompt is q_k and the
response is the whole sample.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from poer_jax.poer import CachePool, TruncationConfig, prefix_tokens, truncate
from poer_jax.sampler import GroupSampler, SampleOutput
from poer_jax.system.multihost import ProcessRows


@dataclasses.dataclass
class Rollout:
    """Host-side result of one rollout; samples are group-major (row g * G + i)."""

    indices: np.ndarray  # [B] dataset rows (questions)
    group_size: int
    prompt_ids: list[np.ndarray]  # [B] question prompts
    prefix_ids: list[np.ndarray]  # [B] reused cached prefixes (empty for full rollouts)
    continuation_ids: list[np.ndarray]  # [B * G] sampled tokens (EOS kept as the last token)
    sampler_logprobs: list[np.ndarray]  # [B * G] policy log-probs of the continuation tokens (at temperature)
    finish_reason: np.ndarray  # [B * G]
    truncation_m: np.ndarray  # [B] m of each group (0 for full rollouts)
    truncation_L: np.ndarray  # [B]
    prefilled_tokens: int
    decoded_tokens: int
    seconds: float
    # the critical path (``SampleOutput``): decode loop iterations, rows they computed (summed over the steps),
    # tokens the decode steps made (decoded_tokens less each sample's first token, which prefill samples), and
    # the sampler's prefill / decode wall time (the rest of ``seconds`` is host work)
    decode_steps: int = 0
    decode_row_steps: int = 0
    decode_step_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def num_samples(self) -> int:
        return len(self.continuation_ids)

    def response_ids(self, n: int) -> np.ndarray:
        """Prefix + continuation of sample n: the response o_i of Eq. 3."""
        return np.concatenate([self.prefix_ids[n // self.group_size], self.continuation_ids[n]])

    @property
    def response_lengths(self) -> np.ndarray:
        G = self.group_size
        return np.asarray([len(self.prefix_ids[n // G]) + len(c) for n, c in enumerate(self.continuation_ids)],
                          np.int32)

    def full_equivalent_decoded(self) -> int:
        """Tokens a full rollout would have decoded for these responses (their whole lengths)."""
        return int(self.response_lengths.sum())


@partial(jax.jit, static_argnames=("config", "eos_ids"))
def _truncate(pool: CachePool, indices: jax.Array, key: jax.Array, config: TruncationConfig,
              eos_ids: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    t = truncate(pool, indices, key, config, eos_ids)
    return prefix_tokens(pool, indices, t), t.prefix_len, t.budget, t.m, t.L


def rollout(
    sampler: GroupSampler,
    indices: np.ndarray,
    prompt_ids: Sequence[np.ndarray],
    group_size: int,
    key: jax.Array,
    *,
    strategy: str,
    max_completion_len: int,
    pool: CachePool | None = None,
    truncation: TruncationConfig | None = None,
    eos_ids: tuple[int, ...] = (),
    rows: ProcessRows | None = None,
    group_offset: int = 0,
) -> tuple[Rollout, SampleOutput]:
    """Sample the step's groups. ``prompt_ids[b]`` is the prompt of question ``indices[b]``.

    Multi-host: ``indices`` are this process's questions, ``rows`` moves them to and from the (global)
    cache pool, and ``group_offset`` is the position of this process's first question in the global batch,
    so a question draws the same samples however the batch is split over processes.
    """
    t0 = time.perf_counter()
    k_trunc, k_sample = jax.random.split(key)
    B = len(indices)
    if strategy == "poer":
        if pool is None or truncation is None:
            raise ValueError("rollout: strategy 'poer' needs the cache pool and a TruncationConfig")
        idx = np.asarray(indices, np.int32)
        out_t = _truncate(pool, jnp.asarray(idx) if rows is None else rows.to_global(idx, fill=-1), k_trunc,
                          truncation, tuple(eos_ids))
        pre, plen, budget, m, L = (jax.device_get(out_t) if rows is None or not rows.multihost
                                   else [rows.to_local(x, B) for x in out_t])  # one transfer on one host
        prefixes = [np.asarray(pre[b, : plen[b]], np.int32) for b in range(B)]
        budgets = [int(x) for x in budget]
        m, L = np.asarray(m, np.int32), np.asarray(L, np.int32)
    elif strategy == "full":
        prefixes = [np.zeros((0,), np.int32) for _ in range(B)]
        budgets = [max_completion_len] * B
        m = L = np.zeros((B,), np.int32)
    else:
        raise ValueError(f"rollout: unknown strategy {strategy!r}")
    prompts = [np.concatenate([np.asarray(prompt_ids[b], np.int32), prefixes[b]]) for b in range(B)]
    # one wait after each prefill round, outside the decode loop, to time prefill and decode apart
    timing: dict[str, float] = {}
    out = sampler.generate([p.tolist() for p in prompts], group_size, budgets, k_sample, timing=timing,
                           group_offset=group_offset)
    n = B * group_size
    cont = [out.tokens[i, : out.lengths[i]].astype(np.int32) for i in range(n)]
    lps = [out.policy_logprobs[i, : out.lengths[i]].astype(np.float32) for i in range(n)]
    r = Rollout(indices=np.asarray(indices), group_size=group_size, prompt_ids=[np.asarray(p) for p in prompt_ids],
                prefix_ids=prefixes, continuation_ids=cont, sampler_logprobs=lps,
                finish_reason=np.asarray(out.finish_reason), truncation_m=m, truncation_L=L,
                prefilled_tokens=out.prefilled_tokens, decoded_tokens=out.generated_tokens,
                seconds=time.perf_counter() - t0, decode_steps=out.decode_steps,
                decode_row_steps=out.decode_row_steps, decode_step_tokens=out.decoded_tokens,
                prefill_s=timing["prefill_s"], decode_s=timing["decode_s"])
    return r, out


def responses_array(r: Rollout, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Full responses as [B, G, width] (cut at width) and their lengths [B, G], for the cache update."""
    B, G = len(r.indices), r.group_size
    tokens = np.full((B, G, width), pad_id, np.int32)
    lengths = np.zeros((B, G), np.int32)
    for n in range(B * G):
        resp = r.response_ids(n)[:width]
        tokens[n // G, n % G, : resp.size] = resp
        lengths[n // G, n % G] = resp.size
    return tokens, lengths


def select_groups(parts: list[tuple[Rollout, np.ndarray, np.ndarray, np.ndarray]], attempt: np.ndarray,
                   row: np.ndarray, G: int) -> tuple[Rollout, np.ndarray]:
    """Concatenate the kept groups (dynamic sampling) of several rollouts into one Rollout: group ``row[j]`` of
    attempt ``attempt[j]`` (``parts[a]`` = (rollout, shaped, raw, ...)), with the raw rewards of those groups."""
    raws = []
    groups: dict[str, list[Any]] = {k: [] for k in ("indices", "prompt_ids", "prefix_ids", "m", "L")}
    samples: dict[str, list[Any]] = {k: [] for k in ("cont", "lps", "finish")}
    for a, g in zip(attempt, row, strict=True):
        r, _, raw, _ = parts[int(a)]
        raws.append(raw[int(g)])
        groups["indices"].append(r.indices[g])
        groups["prompt_ids"].append(r.prompt_ids[g])
        groups["prefix_ids"].append(r.prefix_ids[g])
        groups["m"].append(r.truncation_m[g])
        groups["L"].append(r.truncation_L[g])
        for i in range(g * G, (g + 1) * G):
            samples["cont"].append(r.continuation_ids[i])
            samples["lps"].append(r.sampler_logprobs[i])
            samples["finish"].append(r.finish_reason[i])
    r0 = parts[0][0]
    out = Rollout(indices=np.asarray(groups["indices"]), group_size=G, prompt_ids=groups["prompt_ids"],
                  prefix_ids=groups["prefix_ids"], continuation_ids=samples["cont"], sampler_logprobs=samples["lps"],
                  finish_reason=np.asarray(samples["finish"]), truncation_m=np.asarray(groups["m"]),
                  truncation_L=np.asarray(groups["L"]), prefilled_tokens=r0.prefilled_tokens,
                  decoded_tokens=r0.decoded_tokens, seconds=r0.seconds, decode_steps=r0.decode_steps,
                  decode_row_steps=r0.decode_row_steps, decode_step_tokens=r0.decode_step_tokens,
                  prefill_s=r0.prefill_s, decode_s=r0.decode_s)
    return out, np.stack(raws)
