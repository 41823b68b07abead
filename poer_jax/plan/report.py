"""The plan's verdict: per program and per device, what is live at its peak, against the target's memory.

A training run keeps a *resident set* on every device for its whole life: the train state (float32 master
weights, Adam moments), the reference weights (KL term), the sampler's weights and KV pool, the cache pool.
While one program runs, all of it is live but what the run frees for it (``ProgramSpec.released``: the
trainer drops the sampler's weights and KV pool for the log-prob pass and the update), so a program's peak
per device is

    peak = live resident set + (its arguments - the resident ones among them) + outputs - aliased outputs
           + temporaries

with arguments, outputs, aliases (donated buffers reused for outputs) and temporaries from the compiled
program's ``memory_analysis()``, and each resident buffer counted once, at the largest size any program
passes for it (``ProgramSpec.resident``). A program fits when its peak is at most ``memory_fraction`` of the
chip's memory. A TPU compile that runs out of HBM does not fit; its peak is then the resident set plus the
temporaries the compiler asked for (arguments and outputs unknown). The roofline time is
max(FLOPs / peak FLOP/s, bytes accessed / bandwidth) per device and per call, with FLOPs and bytes per call from
``plan/costs.py`` (loops times their trip counts; a loop whose exit depends on data, like the decode segment's,
counted once: one decode step). ``steps``: a GRPO and a POER step priced from these calls (``plan/step_cost.py``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from poer_jax.model.sharding import device_bytes
from poer_jax.plan.compile import CompiledCost, spec_arg
from poer_jax.plan.step_cost import step_lines
from poer_jax.plan.targets import GB, Target, roofline_seconds
from poer_jax.program_spec import ProgramSpec

ALWAYS_SIZING = ("model.param_dtype", "lora.rank", "mesh.*")  # keys that size every program's resident set


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    name: str
    note: str
    sizing_keys: tuple[str, ...]
    num_shapes: int
    cost: CompiledCost
    resident_args_bytes: int
    peak_bytes: int
    roofline_s: float
    fits: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "note": self.note, "sizing_keys": list(self.sizing_keys),
                "num_shapes": self.num_shapes, **self.cost.to_json(),
                "resident_args_bytes": self.resident_args_bytes, "peak_bytes": self.peak_bytes,
                "roofline_s": self.roofline_s, "fits": self.fits}


@dataclasses.dataclass(frozen=True)
class PlanReport:
    target: Target
    usable_bytes: float
    resident: dict[str, int]
    programs: list[ProgramReport]
    notes: list[str]
    memory_fraction: float
    device_kind: str = ""
    compiler: str = ""
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def failures(self) -> list[str]:
        """One line per program that does not fit, naming it and the config keys that size it."""
        out = []
        for p in self.programs:
            if not p.fits:
                why = f" (the compiler: {p.cost.error})" if p.cost.error else ""
                out.append(
                    f"{p.name} does not fit on {self.target.name}{why}: peak {p.peak_bytes / GB:.1f} GB per device "
                    f"> {self.usable_bytes / GB:.1f} GB usable (resident set {self.resident_bytes / GB:.1f} GB: "
                    + ", ".join(f"{k} {v / GB:.1f}" for k, v in self.resident.items())
                    + f"); change {', '.join(dict.fromkeys((*p.sizing_keys, *ALWAYS_SIZING)))}")
        return out

    def to_json(self) -> dict[str, Any]:
        t = self.target
        return {"target": t.name, "chip": t.chip.name, "num_devices": t.num_devices, "platform": t.platform,
                "device_kind": self.device_kind, "compiler": self.compiler, "topology": t.topology,
                "memory_per_device_bytes": t.chip.memory_bytes, "memory_fraction": self.memory_fraction,
                "usable_bytes": self.usable_bytes, "resident_bytes": self.resident, "fits": self.fits,
                "programs": [p.to_json() for p in self.programs], "steps": self.steps, "notes": self.notes}

    def table(self) -> str:
        t = self.target
        kind = f" ({self.device_kind}; {self.compiler})" if self.device_kind else ""
        lines = [f"target {t.name}: {t.num_devices} x {t.chip.name}{kind}, {t.chip.memory_bytes / GB:.1f} GB per "
                 f"device ({self.usable_bytes / GB:.1f} GB usable at {self.memory_fraction:.0%})",
                 "resident set per device: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in self.resident.items())
                 + f" = {self.resident_bytes / GB:.2f} GB"]
        head = (f"{'program':<16}{'args GB':>9}{'out GB':>8}{'alias GB':>9}{'temp GB':>9}{'peak GB':>9}"
                f"{'of mem':>8}{'TFLOP':>11}{'GB acc':>10}{'roofline':>11}{'shapes':>8}{'compile':>9}  fits")
        lines += [head, "-" * len(head)]
        for p in self.programs:
            c = p.cost
            lines.append(
                f"{p.name:<16}{c.argument_bytes / GB:>9.2f}{c.output_bytes / GB:>8.2f}{c.alias_bytes / GB:>9.2f}"
                f"{c.temp_bytes / GB:>9.2f}{p.peak_bytes / GB:>9.2f}{p.peak_bytes / t.chip.memory_bytes:>8.0%}"
                f"{c.flops / 1e12:>11.2f}{c.bytes_accessed / GB:>10.1f}{p.roofline_s * 1e3:>9.1f}ms"
                f"{p.num_shapes:>8}{c.compile_seconds:>8.0f}s  {'yes' if p.fits else 'NO'}")
        lines += [f"  {p.name}: {p.note}" + _counting(p.cost) for p in self.programs]
        lines += [f"step: {line}" for line in step_lines(self.steps)]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("verdict: every program fits" if self.fits else "verdict: DOES NOT FIT\n" + "\n".join(
            self.failures()))
        return "\n".join(lines)


def loop_label(op_name: str) -> str:
    """A loop's place from its op_name: the last named frame around it ('jvp()', 'shard_map', 'update_step')."""
    skip = {"while", "body", "cond", "closed_call"}
    names = [re.sub(r"^jit\((.*)\)$", r"\1", p) for p in op_name.split("/") if p not in skip]
    return f"loop in {names[-1]}" if names else "loop"


def _counting(c: CompiledCost) -> str:
    """How a program's per-call FLOPs and bytes were counted: its loops and priced kernels."""
    if c.calls is None:
        return ""
    parts = []
    for lp in c.calls.loops:
        where = loop_label(lp.op_name)
        if lp.trip is None:
            parts.append(f"{where} loop counted once (data-dependent exit; an iteration: "
                         f"{lp.flops_per_iteration / 1e12:.3g} TFLOP, {lp.bytes_per_iteration / GB:.3g} GB)")
        elif lp.trip > 1:
            parts.append(f"{where} x{lp.trip}")
    parts += [f"{kind} x{n}" for kind, n in c.calls.kernels]
    parts += [f"unpriced custom call {u}" for u in c.calls.unpriced]
    return f"; per call: {', '.join(parts)}" if parts else ""


def resident_set(specs: list[ProgramSpec], extra: dict[str, Any] | None = None) -> dict[str, int]:
    """Per-device bytes of each named resident buffer: the largest any program passes (``extra``: buffers no
    listed program takes, e.g. the cache pool)."""
    out: dict[str, int] = {}
    for spec in specs:
        for name, where in spec.resident.items():
            out[name] = max(out.get(name, 0), device_bytes(spec_arg(spec, where)))
    for name, tree in (extra or {}).items():
        out[name] = max(out.get(name, 0), device_bytes(tree))
    return out


def build_report(target: Target, specs: list[ProgramSpec], costs: list[CompiledCost], *,
                 extra_resident: dict[str, Any] | None = None, memory_fraction: float = 0.95,
                 notes: list[str] | None = None, device_kind: str = "", compiler: str = "",
                 steps: list[dict[str, Any]] | None = None) -> PlanReport:
    """The verdict for compiled ``specs`` (module docstring)."""
    resident = resident_set(specs, extra_resident)
    total = sum(resident.values())
    usable = target.chip.memory_bytes * memory_fraction
    programs = []
    for spec, c in zip(specs, costs, strict=True):
        r_in = sum(device_bytes(spec_arg(spec, w)) for w in spec.resident.values())
        live = total - sum(resident.get(n, 0) for n in spec.released if n not in spec.resident)
        peak = live - r_in + c.argument_bytes + c.output_bytes - c.alias_bytes + c.temp_bytes
        programs.append(ProgramReport(
            name=spec.name, note=spec.note, sizing_keys=spec.sizing_keys, num_shapes=spec.num_shapes, cost=c,
            resident_args_bytes=r_in, peak_bytes=int(peak),
            roofline_s=roofline_seconds(c.flops, c.bytes_accessed, target.chip),
            fits=c.error is None and peak <= usable))
    return PlanReport(target, usable, resident, programs, list(notes or []), memory_fraction, device_kind, compiler,
                      list(steps or []))
