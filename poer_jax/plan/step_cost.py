"""A GRPO step and a POER step priced from the compiled programs, next to ``plan/projection.py``'s analytic figure.

A training step calls the sampler's prefill and decode programs, the log-prob pass and the update step; each
program's cost per call and per device is known from its compiled form (``plan/costs.py``: FLOPs and bytes, loop
bodies times trip counts, kernels by formula). With the step's work,

    prefill   per prefilled token: the prefill call's cost / (devices x prompts x prompt tokens per call)
    decode    decode steps = ceil(samples / (devices x slots)) x tokens decoded per sample; one step's cost is
              the decode program's per-iteration cost of its data-dependent loop (the decode segment)
    log-probs p calls over the whole rollout (p = 1 with a KL term, + 1 when mu > 1 needs old log-probs)
    update    mu x num_minibatches calls (the analytic figure prices one pass, mu = 1)

each priced at its roofline, max(FLOPs / peak, bytes / bandwidth) per call, and summed: seconds per device per
step. The analytic figure (``projection.step_seconds``) prices the same tokens from the model's shapes alone.

The step is the config's longest (the shapes the programs are compiled at): every response
``rollout.max_completion_len`` tokens after a ``data.max_prompt_len`` prompt; GRPO decodes whole responses, POER
keeps a cached prefix and decodes the truncated tail, m = L / 2 tokens on average (m ~ U{0..L}, Eq. 3;
L = ``cache.max_truncation``, or ``cache.truncation_fraction`` x the response for dynamic truncation), prefilling
prompt + prefix once per group. A decode step attends its whole page table (its compiled width) in both figures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from poer_jax.plan.compile import CompiledCost
from poer_jax.plan.projection import Layout, ModelCost, StepTokens, step_seconds
from poer_jax.plan.targets import Chip, roofline_seconds
from poer_jax.program_spec import ProgramSpec

PROGRAMS = ("sampler/prefill", "sampler/decode", "train/logprobs", "train/update")


def truncated_tokens(cfg: Any) -> float:
    """Mean tokens POER removes from a cached answer and decodes again: L / 2 (m ~ U{0..L}, Eq. 3)."""
    R = cfg.rollout.max_completion_len
    fixed = min(cfg.cache.max_truncation, R)
    dynamic = cfg.cache.truncation_fraction * R
    L = {"fixed": fixed, "dynamic": dynamic, "both": min(fixed, dynamic)}[cfg.cache.truncation]
    return L / 2


def step_tokens(cfg: Any, context_tokens: int, seq_len: int) -> dict[str, StepTokens]:
    """{'GRPO', 'POER'}: the config's longest step (module docstring). ``context_tokens``: what a decode step
    attends (the compiled page table); ``seq_len``: the update's padded length."""
    Q, G = cfg.data.questions_per_step, cfg.rollout.group_size
    P, R = cfg.data.max_prompt_len, cfg.rollout.max_completion_len
    n = Q * G
    m = truncated_tokens(cfg)
    kept = R - m
    grpo = StepTokens(samples=n, prefilled=Q * P, decoded=n * R, trained=n * seq_len, prefill_context=P / 2,
                      decode_context=context_tokens, train_context=seq_len / 2)
    poer = StepTokens(samples=n, prefilled=Q * (P + kept), decoded=n * m, trained=n * seq_len,
                      prefill_context=(P + kept) / 2, decode_context=context_tokens, train_context=seq_len / 2)
    return {"GRPO": grpo, "POER": poer}


def logprob_passes(cfg: Any) -> int:
    """Log-prob passes over the rollout per step: reference (beta > 0) and old log-probs (mu > 1)."""
    return int(cfg.loss.beta > 0) + int(cfg.optim.num_iterations > 1)


def _decode_step(cost: CompiledCost) -> tuple[float, float]:
    """(FLOPs, bytes) of one decode step: the decode program's outermost data-dependent loop, per iteration."""
    loops = cost.calls.data_dependent_loops if cost.calls is not None else ()
    if not loops:
        return cost.flops, cost.bytes_accessed
    outer = min(loops, key=lambda lp: lp.op_name.count("/while"))
    return outer.flops_per_iteration, outer.bytes_per_iteration


def price_steps(cfg: Any, mcfg: Any, mesh_size: int, specs: list[ProgramSpec], costs: list[CompiledCost],
                chip: Chip) -> list[dict[str, Any]]:
    """One row per strategy (GRPO, POER): call counts, seconds per phase from the compiled programs and from
    ``projection.step_seconds`` on the same tokens (module docstring). Needs all four programs."""
    by_name = {s.name: (s, c) for s, c in zip(specs, costs, strict=True)}
    if any(name not in by_name or by_name[name][1].error for name in PROGRAMS):
        return []
    pre_s, pre_c = by_name["sampler/prefill"]
    dec_s, dec_c = by_name["sampler/decode"]
    lp_s, lp_c = by_name["train/logprobs"]
    up_s, up_c = by_name["train/update"]
    D, S = dec_s.dims["devices"], dec_s.dims["slots"]
    pre_tokens = pre_s.dims["devices"] * pre_s.dims["prompts"] * pre_s.dims["prompt_tokens"]
    step_f, step_b = _decode_step(dec_c)
    p = logprob_passes(cfg)
    lay = Layout(rollout_chips=mesh_size, train_chips=mesh_size, max_decode_batch=S, logprob_passes=p,
                 remat=mcfg.remat)
    model = ModelCost.from_config(mcfg, bytes_per_value=np.dtype(mcfg.jnp_dtype).itemsize)
    rows = []
    for name, tok in step_tokens(cfg, dec_s.dims["context_tokens"], up_s.dims["seq_len"]).items():
        prefill_calls = tok.prefilled / pre_tokens
        decode_steps = math.ceil(tok.samples / (D * S)) * tok.decoded / tok.samples
        lp_calls = p * tok.trained / (lp_s.dims["rows"] * lp_s.dims["seq_len"])
        up_calls = cfg.optim.num_iterations * tok.trained / (up_s.dims["rows"] * up_s.dims["seq_len"])
        compiled = {
            "prefill": prefill_calls * roofline_seconds(pre_c.flops, pre_c.bytes_accessed, chip),
            "decode": decode_steps * roofline_seconds(step_f, step_b, chip),
            "logprobs": lp_calls * roofline_seconds(lp_c.flops, lp_c.bytes_accessed, chip),
            "update": up_calls * roofline_seconds(up_c.flops, up_c.bytes_accessed, chip),
        }
        compiled["rollout"] = compiled["prefill"] + compiled["decode"]
        compiled["step"] = compiled["rollout"] + compiled["logprobs"] + compiled["update"]
        analytic = step_seconds(tok, model, chip, lay)
        rows.append({"strategy": name, "tokens": {"samples": tok.samples, "prefilled": tok.prefilled,
                                                  "decoded": tok.decoded, "trained": tok.trained},
                     "calls": {"prefill": prefill_calls, "decode_steps": decode_steps, "logprobs": lp_calls,
                               "update": up_calls},
                     "compiled_s": compiled, "analytic_s": analytic,
                     "ratio": compiled["step"] / analytic["step"] if analytic["step"] else float("nan")})
    return rows


def step_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The report's per-step lines."""
    out = []
    for r in rows:
        c, a, n = r["compiled_s"], r["analytic_s"], r["calls"]
        out.append(
            f"{r['strategy']} step: {n['prefill']:.1f} prefill calls, {n['decode_steps']:.0f} decode steps, "
            f"{n['logprobs']:.1f} log-prob and {n['update']:.1f} update calls: {c['step']:.2f} s per device "
            f"(rollout {c['rollout']:.2f}, log-probs {c['logprobs']:.2f}, update {c['update']:.2f}); analytic "
            f"(plan/projection.py) {a['step']:.2f} s (rollout {a['rollout']:.2f}, update + log-probs "
            f"{a['update']:.2f}): {r['ratio']:.2f}x")
    return out
