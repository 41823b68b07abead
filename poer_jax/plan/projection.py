"""Projected step time of POER and GRPO on an accelerator, from a run's token counts and roofline costs.

A CPU measures the wrong ratio: it does ~6 FLOPs per byte of memory traffic where an H100 does ~300, so
on a CPU the update's FLOPs dominate a step, while on an accelerator decoding is bandwidth-bound and
dominates GRPO's. So instead of timing a real model, this module prices the tokens a step handles with
the roofline cost of each kind of token for a real model on a real chip (``plan.targets.CHIPS``):

  prefill   (compute-bound)    F_pre = 2 N + a c                            per prompt / prefix token
  decode    (bandwidth-bound)  max(F_dec / peak, (W / b + c k) / bandwidth),  F_dec = 2 N + a c
  update    (compute-bound)    F_upd = (6 N + 3 a c) (4/3 with remat) + p (2 N + a c)   per trained token

N: matmul parameters a token touches (embedding lookup excluded, LM head included); a = 4 x layers x
query heads x head dim (attention FLOPs per query-context token pair, QK^T and PV); c: the mean context a
token attends to; W: weight bytes; k: KV-cache bytes per token (all layers); b: sequences decoding at once
on a chip (the decode batch; the weights are read once per decode step for all of them); p: extra
forward passes for old / reference log-probs (mu > 1, or a KL term). Roofline times are lower bounds: real
kernels reach some fraction of them, and the fraction differs between decoding (bandwidth) and training
(FLOPs), so the ratio is a projection, not a measurement.

Decode priced by decode steps (``StepTokens.decode_steps``, a run's ``rollout/decode_steps``): a batched
decode runs until its longest sample stops, and each step reads the weights once whatever the number of rows
still producing tokens, so a rollout whose few long samples keep the loop going costs more than its tokens say.
With S decode steps per chip (the measured steps of one rollout, times the waves when a chip holds more rows
than ``max_decode_batch``) and r = decoded / (chips x S) rows producing a token per step,

  decode step  max(r F_dec / peak, (W + r c k) / bandwidth)       memory-bound when the second term is larger
  decode       S x decode step

which equals the per-token price when every row of every step makes a token (r = b). FLOPs count the live
rows (an engine that drops finished rows; poer_jax's decode computes them along, which a memory-bound step
hides). ``DecodeSteps.bound`` says which term sets the step. The steps of a rollout follow its longest
continuation, not the batch, so ``scaled`` keeps them.

Token counts are those a run measured (``tokens/prefilled``, ``tokens/decoded``, ``tokens/trained`` per
step). POER changes only the rollout: it decodes a continuation instead of a whole answer and prefills
question + prefix once per group, while its update still runs over every token of prompt + response (the
continuation attends to the prefix, so the backward pass goes through it). The paper's 7.4 % (Figure 3,
1.5B, G 6, L 300) was measured with one H20 GPU sampling for eight training, which makes the rollout the
bulk of a GRPO step; ``Layout(rollout_chips=1, train_chips=8)`` prices that setup, the default prices a
data-parallel rollout on every chip as this project runs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from poer_jax.plan.targets import CHIPS, Chip

__all__ = ["H20", "DecodeSteps", "Layout", "ModelCost", "StepTokens", "decode_by_steps", "get_chip",
           "project_ratio", "step_seconds"]

# The paper's GPU (Sec. 4.3: 8 x H20, one sampling): 96 GB HBM3, 4.0 TB/s, 148 TFLOP/s bf16 dense (public specs).
H20 = Chip("H20 96GB", 96e9, 4.0e12, 148e12)


def get_chip(name: str | Chip) -> Chip:
    """A chip of ``plan.targets.CHIPS`` by name, or ``"h20"`` (the paper's GPU)."""
    if isinstance(name, Chip):
        return name
    if name == "h20":
        return H20
    if name not in CHIPS:
        raise KeyError(f"unknown chip {name!r}; known: {', '.join(sorted(CHIPS))}, h20")
    return CHIPS[name]


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Roofline figures of one model: see the module docstring for N, a, W and k."""

    name: str
    matmul_params: float  # N
    attn_flops_per_pair: float  # a
    weight_bytes: float  # W
    kv_bytes_per_token: float  # k

    @classmethod
    def from_config(cls, cfg: Any, name: str = "", bytes_per_value: int = 2) -> ModelCost:
        """From a ``QwenConfig`` (weights and KV cache at ``bytes_per_value`` bytes each, bf16 by default)."""
        h, d, L = cfg.hidden_size, cfg.head_dim, cfg.num_layers
        q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size
        head = h * cfg.vocab_size
        embed = 0 if cfg.tie_word_embeddings else h * cfg.vocab_size
        n = L * per_layer + head
        return cls(name=name, matmul_params=float(n), attn_flops_per_pair=4.0 * L * q,
                   weight_bytes=float((n + embed) * bytes_per_value),
                   kv_bytes_per_token=float(2 * L * kv * bytes_per_value))


@dataclasses.dataclass(frozen=True)
class StepTokens:
    """One step's token counts (whole batch) and the mean context lengths they attend to."""

    samples: float  # sequences decoded in the step (questions x G)
    prefilled: float
    decoded: float
    trained: float
    prefill_context: float  # mean context of a prefilled token (about half a prompt: causal attention)
    decode_context: float  # mean context of a decoded token (prompt + prefix + half the continuation)
    train_context: float  # mean context of a trained token (about half a sequence)
    decode_steps: float | None = None  # decode loop iterations of one rollout on one chip (measured); None: unknown

    def scaled(self, factor: float) -> StepTokens:
        """The same step with ``factor`` times the questions (counts scale, contexts do not)."""
        return dataclasses.replace(self, samples=self.samples * factor, prefilled=self.prefilled * factor,
                                   decoded=self.decoded * factor, trained=self.trained * factor)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Chips that run the rollout and the update (both data-parallel over their chips), the largest decode
    batch per chip, and the extra log-prob passes (``p``) and rematerialisation of the update."""

    rollout_chips: int = 8
    train_chips: int = 8
    max_decode_batch: int = 256
    logprob_passes: int = 0
    remat: bool = True


@dataclasses.dataclass(frozen=True)
class DecodeSteps:
    """Decode priced by steps (module docstring): seconds in all, per step, the steps and live rows per chip, and
    which bound sets a step ('memory': weights + KV bytes over bandwidth; 'compute': live rows x FLOPs)."""

    seconds: float
    step_s: float
    steps: float
    live_rows: float
    bound: str


def decode_by_steps(tokens: StepTokens, model: ModelCost, chip: Chip | str, layout: Layout | None = None
                    ) -> DecodeSteps:
    """Decode time from the measured decode steps (``tokens.decode_steps`` must be set)."""
    if tokens.decode_steps is None or tokens.decode_steps <= 0:
        raise ValueError(f"projection: decode by steps needs decode_steps > 0, got {tokens.decode_steps}")
    chip = get_chip(chip)
    lay = layout or Layout()
    rows_per_chip = tokens.samples / lay.rollout_chips
    waves = max(1.0, float(-(-rows_per_chip // lay.max_decode_batch)))
    steps = tokens.decode_steps * waves
    live = tokens.decoded / lay.rollout_chips / steps
    compute = live * (2 * model.matmul_params + model.attn_flops_per_pair * tokens.decode_context) / chip.peak_flops
    memory = (model.weight_bytes + live * tokens.decode_context * model.kv_bytes_per_token) / chip.bandwidth
    step = max(compute, memory)
    return DecodeSteps(seconds=steps * step, step_s=step, steps=steps, live_rows=live,
                       bound="memory" if memory >= compute else "compute")


def step_seconds(tokens: StepTokens, model: ModelCost, chip: Chip | str, layout: Layout | None = None
                 ) -> dict[str, float]:
    """Roofline seconds of one step: {'prefill', 'decode', 'rollout', 'update', 'step'}; with
    ``tokens.decode_steps`` also decode priced by steps: {'decode_by_steps', 'rollout_by_steps', 'step_by_steps',
    'decode_step_s', 'decode_memory_bound' (1.0 when a step is memory-bound, 0.0 when compute-bound)}."""
    chip = get_chip(chip)
    lay = layout or Layout()
    n, a = model.matmul_params, model.attn_flops_per_pair
    prefill = tokens.prefilled * (2 * n + a * tokens.prefill_context) / (chip.peak_flops * lay.rollout_chips)
    batch = max(1.0, min(lay.max_decode_batch, tokens.samples / lay.rollout_chips))
    flops_tok = 2 * n + a * tokens.decode_context
    bytes_tok = model.weight_bytes / batch + tokens.decode_context * model.kv_bytes_per_token
    per_token = max(flops_tok / chip.peak_flops, bytes_tok / chip.bandwidth)
    decode = tokens.decoded / lay.rollout_chips * per_token
    fwd = 2 * n + a * tokens.train_context
    upd_flops = tokens.trained * (3 * fwd * (4 / 3 if lay.remat else 1.0) + lay.logprob_passes * fwd)
    update = upd_flops / (chip.peak_flops * lay.train_chips)
    out = {"prefill": prefill, "decode": decode, "rollout": prefill + decode, "update": update,
           "step": prefill + decode + update}
    if tokens.decode_steps is not None:
        d = decode_by_steps(tokens, model, chip, lay)
        out.update(decode_by_steps=d.seconds, rollout_by_steps=prefill + d.seconds,
                   step_by_steps=prefill + d.seconds + update, decode_step_s=d.step_s,
                   decode_memory_bound=float(d.bound == "memory"))
    return out


def project_ratio(poer: StepTokens, grpo: StepTokens, models: Mapping[str, ModelCost], chips: Mapping[str, str],
                  layouts: Mapping[str, Layout]) -> list[dict[str, Any]]:
    """POER / GRPO step-time ratios for every (model, chip, layout): rows with both steps' seconds."""
    rows = []
    for mname, model in models.items():
        for cname, chip in chips.items():
            for lname, lay in layouts.items():
                p, g = step_seconds(poer, model, chip, lay), step_seconds(grpo, model, chip, lay)
                row = {"model": mname, "chip": cname, "layout": lname, "poer_step_s": p["step"],
                       "grpo_step_s": g["step"], "step_ratio": p["step"] / g["step"],
                       "rollout_ratio": p["rollout"] / g["rollout"],
                       "grpo_rollout_share": g["rollout"] / g["step"], "poer": p, "grpo": g}
                if "step_by_steps" in p and "step_by_steps" in g:
                    row.update(poer_step_by_steps_s=p["step_by_steps"], grpo_step_by_steps_s=g["step_by_steps"],
                               step_ratio_by_steps=p["step_by_steps"] / g["step_by_steps"],
                               rollout_ratio_by_steps=p["rollout_by_steps"] / g["rollout_by_steps"],
                               poer_decode_bound="memory" if p["decode_memory_bound"] else "compute",
                               grpo_decode_bound="memory" if g["decode_memory_bound"] else "compute")
                rows.append(row)
    return rows
