"""FLOPs and bytes per call of a compiled program: XLA's cost analysis with loop bodies times their trip counts and
custom-call kernels priced by formula.

XLA's cost analysis (``compiled.cost_analysis()``, or ``hlo_module_cost_analysis`` over the optimized module)
counts a while loop's body once, and a custom call (cuDNN, cuBLAS, Pallas / Triton / Mosaic kernels, FFI) as
nothing. A lax.scan over 28 layers inside a loop over micro-batches is then one layer of one micro-batch. Here
the optimized HLO module is split into its computations; each loop body (and condition) is costed by XLA on its
own (a module with that computation as entry), and

    per_call(C) = xla(C) + sum over loops w in C: trip_w per_call(body_w) + (trip_w + 1) per_call(cond_w)
                                                  - xla(body_w) - xla(cond_w)
                  + sum over custom calls k reached from C without entering a loop: formula(k)

Trip counts come from ``plan/hlo.py`` (XLA's annotation, the loop condition, or a count's cap). A loop whose exit
depends on data (the decode segment: until every sample has finished) is counted once: ``loops`` lists it with its
cost per iteration (for the decode segment, one decode step).

Custom calls by formula (worst case: every page of a page table attended; causal masks half the scores):
  cuDNN fused attention   fwd 4 B H Tq Tk d x 1/2 (causal), backward 2.5 x that (five matmuls for two)
  cuBLAS GEMM             2 x output elements x contracted size
  splash attention (TPU)  fwd 4 (q elements) T x 1/2; fused backward (dq, dk, dv) 2.5 x fwd
  paged attention         4 x (query elements) x (pages in the tables) x page: our Triton kernel
                          (``sampler/pallas_gpu.py``) and the ragged kernel (``sampler/pallas_tpu.py``); bytes:
                          the K and V of those pages, not the whole pool the call takes as an operand
  packed CPU matmul       2 M K N (``model/packed_matmul.py``)
Bytes of the others: operands + results. Unknown custom calls count nothing and are listed in ``unpriced``.

Bytes of gathers and scatters inside fusions: XLA counts a fused gather's operand whole, and a fused in-place
scatter as reading and writing its whole operand; a decode step's page gathers and KV writes would then move the
whole pool per chunk and per layer (thousands of GB per step for the 7B). They are counted here as XLA counts them
unfused: a gather reads what it outputs, a scatter reads its indices and updates and writes its updates
(``fusion_bytes_correction``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from poer_jax.plan.hlo import (
    ARRAY,
    DTYPE_BYTES,
    FRAME,
    OP_NAME,
    Comp,
    Instr,
    arrays,
    closing,
    loop_parts,
    nbytes,
    parse_module,
    reachable,
    trip_count,
)

_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_KERNEL_NAME = re.compile(r'\bname = "([^"]*)"')


@dataclasses.dataclass(frozen=True)
class LoopCost:
    """One while loop: where it is (its op_name), its trip count (None: data-dependent, counted once) and how
    it was found, and the cost of one iteration (body, nested loops multiplied)."""

    op_name: str
    trip: int | None
    source: str  # "known_trip_count" | "condition" | "bound" (a capped count, at its cap) | "data-dependent"
    flops_per_iteration: float
    bytes_per_iteration: float


@dataclasses.dataclass(frozen=True)
class CallCost:
    """Per-call FLOPs and bytes accessed of one program on one device (module docstring)."""

    flops: float
    bytes_accessed: float
    xla_flops: float  # XLA's own figure for the module (every loop body once, custom calls as nothing)
    xla_bytes_accessed: float
    loops: tuple[LoopCost, ...] = ()
    kernels: tuple[tuple[str, int], ...] = ()  # priced custom calls: (kind, calls per call of the program)
    unpriced: tuple[str, ...] = ()

    @property
    def data_dependent_loops(self) -> tuple[LoopCost, ...]:
        return tuple(lp for lp in self.loops if lp.trip is None)

    def to_json(self) -> dict[str, Any]:
        return {"flops": self.flops, "bytes_accessed": self.bytes_accessed,
                "xla_flops_loop_bodies_once": self.xla_flops,
                "xla_bytes_accessed_loop_bodies_once": self.xla_bytes_accessed,
                "loops": [dataclasses.asdict(lp) for lp in self.loops], "kernels": dict(self.kernels),
                "unpriced_custom_calls": list(self.unpriced)}


# ---- custom calls ---------------------------------------------------------------------------------------
def _operand_shapes(ins: Instr, comp: Comp) -> list[str]:
    m = re.search(r"operand_layout_constraints=\{", ins.attrs)
    if m:
        start = m.end() - 1
        body = ins.attrs[start + 1 : closing(ins.attrs, start)]
        return [f"{dt}[{dims}]" for dt, dims in ARRAY.findall(body)]
    return [comp.instrs[o].shape if o in comp.instrs else "" for o in ins.operands]


def _kernel_name(ins: Instr) -> str:
    m = _KERNEL_NAME.search(ins.attrs)
    if m:
        return m.group(1)
    op = OP_NAME.search(ins.attrs)
    parts = op.group(1).split("/") if op else []
    if parts and parts[-1] == "pallas_call" and len(parts) > 1:
        return re.sub(r"^vmap\((.*)\)$", r"\1", parts[-2])
    return re.sub(r"\.\d+$", "", ins.name)


def _prod(shape: str) -> int:
    a = arrays(shape)
    return math.prod(a[0][1]) if a else 0


def _dims(shape: str) -> tuple[int, ...]:
    a = arrays(shape)
    return a[0][1] if a else ()


def price_custom_call(ins: Instr, comp: Comp) -> tuple[str, float, float] | None:
    """(kind, FLOPs, bytes) of a custom call by formula (module docstring), or None when unknown."""
    target_m = _TARGET.search(ins.attrs)
    target = target_m.group(1) if target_m else ""
    ops = _operand_shapes(ins, comp)
    io_bytes = sum(nbytes(s) for s in ops) + nbytes(ins.shape)
    results = arrays(ins.shape)
    if target.startswith("__cudnn$fmha"):
        cfg = json.loads(ins.attrs[ins.attrs.index("backend_config=") + len("backend_config="):].split(
            ", metadata=")[0]) if "backend_config={" in ins.attrs else {}
        fmha = cfg.get("cudnn_fmha_backend_config", {})
        b, h, tq, tk = (int(x) for x in fmha.get("intermediate_tensor_shape", {}).get("dimensions", [0, 0, 0, 0]))
        d = _dims(ops[0])[-1] if ops else 0
        causal = 0.5 if "CAUSAL" in fmha.get("mask_type", "") else 1.0
        flops = 4.0 * b * h * tq * tk * d * causal * (2.5 if "Backward" in target else 1.0)
        return ("cudnn attention" + (" backward" if "Backward" in target else ""), flops, io_bytes)
    if target in ("__cublas$gemm", "__cublas$lt$matmul"):
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
        lhs = _dims(ops[0]) if ops else ()
        k = math.prod(lhs[int(i.strip('" '))] for i in m.group(1).split(",") if i.strip()) if m and lhs else 0
        out = results[0][1] if results else ()
        return ("cublas gemm", 2.0 * math.prod(out) * k, io_bytes)
    if target.startswith("poer_packed_matmul"):
        k = _dims(ops[0])[-1] if ops else 0
        return ("packed cpu matmul", 2.0 * _prod(ins.shape) * k, io_bytes)
    name = _kernel_name(ins)
    if target == "__gpu$xla.gpu.triton" and name == "poer_paged_attention":
        # operands: q [..., rows, hd] (pre-scaled), k / v pool [1, pages, page, hd], -, tables [..., pages]
        q, pool, table = _dims(ops[0]), _dims(ops[1]), _dims(ops[3])
        ctx_pages, page, hd = math.prod(table), pool[-2], q[-1]  # pages over every (row, KV head) instance
        kv = 2.0 * ctx_pages * page * hd * DTYPE_BYTES.get(arrays(ops[1])[0][0], 2)
        flops = 4.0 * q[-2] * hd * page * ctx_pages  # each instance's query rows (q[-2]) against its pages
        return ("paged attention (triton)", flops, io_bytes - nbytes(ops[1]) - nbytes(ops[2]) + kv)
    if target == "tpu_custom_call" and name == "poer_ragged_paged_attention":
        # operands: kv_lens, pages [R, P], cu_q_lens, distribution, num_seqs, q [R, Hq, hd], kv [N, page, 2 Hkv, hd]
        pages, q, kv = _dims(ops[1]), _dims(ops[5]), _dims(ops[6])
        ctx = math.prod(pages) // max(pages[0], 1) * kv[1]
        flops = 4.0 * math.prod(q) * ctx
        kv_bytes = math.prod(pages) * kv[1] * kv[2] * kv[3] * DTYPE_BYTES.get(arrays(ops[6])[0][0], 2)
        return ("paged attention (ragged, mosaic)", flops, io_bytes - nbytes(ops[6]) + kv_bytes)
    if target == "tpu_custom_call" and name.startswith("splash_mha"):
        # operands: the masks' block tables (int8), then q [..., H, T, d], k, v, ... (a backward kernel's results
        # hold per-block partial dq: not the queries' shape)
        q = next((dims for dt, dims in (arrays(o)[0] for o in ops if arrays(o))
                  if dt in ("bf16", "f16", "f32") and len(dims) >= 3), ())
        t = q[-2] if len(q) >= 2 else 0
        fwd = 4.0 * math.prod(q) * t * 0.5
        if "_fwd" in name:
            return ("splash attention", fwd, io_bytes)
        if "_dkv" in name and len(results) >= 3:
            return ("splash attention backward", 2.5 * fwd, io_bytes)
        if "_dq" in name:
            return ("splash attention backward (dq)", 1.5 * fwd, io_bytes)
    return None


def _through_views(fused: Comp, users: dict[str, list[Instr]], name: str) -> list[tuple[Instr, str]]:
    """The users of ``name`` in a fused computation, looking through bitcasts and reshapes: (user, operand name)."""
    out = []
    for u in users.get(name, []):
        if u.opcode in ("bitcast", "reshape"):
            out += _through_views(fused, users, u.name)
        else:
            out.append((u, name))
    return out


def fusion_bytes_correction(ins: Instr, comps: dict[str, Comp]) -> float:
    """What to add to XLA's bytes accessed for a fusion: XLA counts a fused parameter that only feeds gathers as
    read whole, and a fused in-place scatter as reading and writing its whole operand (a KV pool per decode step);
    unfused, it counts a gather's output and 3 x a scatter's updates, as here."""
    m = re.search(r"calls=%([\w.\-]+)", ins.attrs)
    fused = comps.get(m.group(1)) if m else None
    if fused is None:
        return 0.0
    if "kind=kCustom" in ins.attrs and any(i.opcode in ("gather", "scatter") for i in fused.instrs.values()):
        return 0.0  # XLA costs a custom fusion around a gather / scatter as that gather / scatter already (TPU)
    users: dict[str, list[Instr]] = {}
    for i in fused.instrs.values():
        for o in i.operands:
            users.setdefault(o, []).append(i)
    root = fused.root
    outputs = [fused.instrs[o] for o in root.operands if o in fused.instrs] if root and root.opcode == "tuple" \
        else [root] if root else []
    delta = 0.0
    for param in (i for i in fused.instrs.values() if i.opcode == "parameter"):
        uses = _through_views(fused, users, param.name)
        if not uses:
            continue
        size = nbytes(param.shape)
        if all(u.opcode == "gather" and u.operands[0] == via for u, via in uses):
            delta -= size - sum(nbytes(u.shape) for u, _ in uses)
        elif all(u.opcode == "scatter" and u.operands[0] == via and len(u.operands) == 3 for u, via in uses):
            for u, _ in uses:
                updates = nbytes(fused.instrs[u.operands[2]].shape) if u.operands[2] in fused.instrs else 0.0
                delta -= size - updates  # the operand is updated in place: read as much as is written
                if any(o is u or (o.opcode == "bitcast" and o.operands and o.operands[0] == u.name) for o in outputs):
                    delta -= nbytes(u.shape) - updates  # the output: only the updated rows are written
    return delta


_FREE_CUSTOM_CALLS = ("AllocateBuffer", "AssumeGatherIndicesInBound", "GatherScatterIndicesBitpacked", "Sharding",
                      "SPMDFullToShardShape", "SPMDShardToFullShape", "MoveToHost", "MoveToDevice")


# ---- the walk -------------------------------------------------------------------------------------------
def _module_text(comps: dict[str, Comp], names: list[str], entry: str) -> str:
    order = [n for n in comps if n in names]
    out = ["HloModule sub", ""]
    for n in order:
        lines = list(comps[n].lines)
        head = re.sub(r"^ENTRY\s+", "", lines[0])
        lines[0] = ("ENTRY " + head) if n == entry else head
        out += lines + [""]
    return "\n".join(out)


def _xla_cost(text: str) -> tuple[float, float]:
    import jax
    from jax._src.lib import xla_client
    from jaxlib import _hlo

    client = jax.local_devices(backend="cpu")[0].client
    module = _hlo.hlo_module_from_text(FRAME.sub("", text))  # no stack-frame table: drop its ids
    cost = xla_client._xla.hlo_module_cost_analysis(client, module)
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def call_cost(hlo_text: str) -> CallCost:
    """Per-call cost of an optimized HLO module's text (``compiled.as_text()``); see the module docstring."""
    comps = parse_module(hlo_text)
    entry = next((c.name for c in comps.values() if c.entry), None)
    if entry is None:
        raise ValueError("call_cost: no ENTRY computation in the module text")
    once: dict[str, tuple[float, float]] = {entry: _xla_cost(hlo_text)}
    memo: dict[str, tuple[float, float]] = {}
    loops: list[LoopCost] = []
    kernels: dict[str, int] = {}
    unpriced: list[str] = []

    def xla_once(name: str) -> tuple[float, float]:
        if name not in once:
            once[name] = _xla_cost(_module_text(comps, reachable(name, comps), name))
        return once[name]

    def per_call(name: str, mult: float) -> tuple[float, float]:
        if name in memo:
            return memo[name]
        flops, nbytes_ = xla_once(name)
        for cname in reachable(name, comps, enter_loops=False):
            comp = comps[cname]
            for ins in comp.instrs.values():
                if ins.opcode == "fusion":
                    nbytes_ += fusion_bytes_correction(ins, comps)
                elif ins.opcode == "custom-call":
                    priced = price_custom_call(ins, comp)
                    if priced is None:
                        target = _TARGET.search(ins.attrs)
                        t = target.group(1) if target else "?"
                        if t not in _FREE_CUSTOM_CALLS and t not in unpriced:
                            unpriced.append(f"{t} ({_kernel_name(ins)})")
                        continue
                    kind, f, b = priced
                    kernels[kind] = kernels.get(kind, 0) + int(mult)
                    flops += f + 1.0  # XLA counts a custom call as -1
                    nbytes_ += b + 1.0
                elif ins.opcode == "while":
                    cond, body = loop_parts(ins)
                    trip, source = trip_count(ins, comp, comps)
                    n = 1 if trip is None else trip
                    bf, bb = per_call(body, mult * n)
                    cf, cb = per_call(cond, mult * (n + 1))
                    of_b, ob_b = xla_once(body)
                    of_c, ob_c = xla_once(cond)
                    flops += n * bf + (n + 1) * cf - of_b - of_c
                    nbytes_ += n * bb + (n + 1) * cb - ob_b - ob_c
                    op = OP_NAME.search(ins.attrs)
                    loops.append(LoopCost(op.group(1) if op else ins.name, trip, source, bf + cf, bb + cb))
        memo[name] = (flops, nbytes_)
        return memo[name]

    flops, nbytes_ = per_call(entry, 1.0)
    return CallCost(flops=flops, bytes_accessed=nbytes_, xla_flops=once[entry][0], xla_bytes_accessed=once[entry][1],
                    loops=tuple(loops), kernels=tuple(sorted(kernels.items())), unpriced=tuple(unpriced))
