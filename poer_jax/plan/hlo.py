"""An optimized HLO module's text (``compiled.as_text()``) as computations and instructions, and its while loops'
trip counts: what ``plan/costs.py`` walks.

Trip counts: XLA's ``known_trip_count`` annotation (GPU, CPU), else the loop condition ``i < N`` with ``i``
starting at a constant (lax.scan / fori_loop on TPU, whose compiler does not annotate), or ``i < n`` with ``n``
capped, ``minimum(..., N)``: the cap, the worst case (the decode attention's chunk loop, which stops at the longest
sequence but reads at most the table). Otherwise the exit depends on data (the decode segment): None.
"""

from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s")
TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
REF = re.compile(r"%([\w.\-]+)")
FRAME = re.compile(r" stack_frame_id=\d+")
OP_NAME = re.compile(r'op_name="([^"]*)"')


# ---- HLO text -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Instr:
    """One instruction: ``%name = shape opcode(operands), attrs``."""

    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool
    args: str = ""  # the text between the opcode's parentheses (a constant's literal)


@dataclasses.dataclass
class Comp:
    """One computation: its text lines, instructions by name, root, and whether it is the entry."""

    name: str
    lines: list[str]
    instrs: dict[str, Instr]
    root: Instr | None
    entry: bool


def closing(s: str, start: int) -> int:
    """Index of the bracket closing s[start] ('(' or '{'), skipping quoted strings."""
    open_c = s[start]
    close_c = {"(": ")", "{": "}", "[": "]"}[open_c]
    depth, i, quoted = 0, start, False
    while i < len(s):
        c = s[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == open_c:
            depth += 1
        elif c == close_c:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return len(s) - 1


def parse_instr(line: str) -> Instr | None:
    text = line.strip()
    root = text.startswith("ROOT ")
    if root:
        text = text[5:]
    if not text.startswith("%") or " = " not in text:
        return None
    name, rest = text[1:].split(" = ", 1)
    if rest.startswith("("):
        end = closing(rest, 0)
        shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren]
    end = closing(rest, paren)
    operands = REF.findall(rest[paren + 1 : end])
    return Instr(name, shape, opcode, operands, rest[end + 1 :], root, rest[paren + 1 : end])


def parse_module(text: str) -> dict[str, Comp]:
    """Computations of an HLO module's text by name, each with its instructions (an instruction may span lines:
    a backend config can hold newlines; a computation ends at a line that is only '}')."""
    comps: dict[str, Comp] = {}
    cur: Comp | None = None
    stmt: list[str] = []

    def flush() -> None:
        if cur is not None and stmt:
            ins = parse_instr("\n".join(stmt))
            if ins is not None:
                cur.instrs[ins.name] = ins
                if ins.root:
                    cur.root = ins
        stmt.clear()

    for line in text.splitlines():
        if cur is None:
            if line and not line.startswith((" ", "HloModule", "//")) and line.rstrip().endswith("{"):
                m = _HEADER.match(line)
                if m:
                    cur = Comp(m.group(2), [line], {}, None, bool(m.group(1)))
            continue
        cur.lines.append(line)
        if line.rstrip() == "}":
            flush()
            comps[cur.name] = cur
            cur = None
        elif line.startswith(("  %", "  ROOT %")):
            flush()
            stmt.append(line)
        else:
            stmt.append(line)
    return comps


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in a shape string (tuples flattened)."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in ARRAY.findall(shape)]


def nbytes(shape: str) -> float:
    return sum(DTYPE_BYTES.get(dt, 0) * math.prod(dims) for dt, dims in arrays(shape))


def reachable(name: str, comps: dict[str, Comp], enter_loops: bool = True) -> list[str]:
    """Computations reached from ``name`` (itself first); without entering while loops when ``enter_loops`` is
    False (their bodies and conditions are costed apart)."""
    seen, todo = [name], [name]
    while todo:
        comp = comps[todo.pop()]
        for ins in comp.instrs.values():
            if ins.opcode == "while" and not enter_loops:
                continue
            for r in REF.findall(ins.attrs):
                if r in comps and r not in seen:
                    seen.append(r)
                    todo.append(r)
    return seen


# ---- loops ----------------------------------------------------------------------------------------------
def loop_parts(ins: Instr) -> tuple[str, str]:
    cond = re.search(r"condition=%([\w.\-]+)", ins.attrs)
    body = re.search(r"body=%([\w.\-]+)", ins.attrs)
    if not cond or not body:
        raise ValueError(f"while {ins.name}: no condition / body in {ins.attrs[:200]}")
    return cond.group(1), body.group(1)


def constant(comp: Comp, name: str) -> int | None:
    ins = comp.instrs.get(name)
    while ins is not None and ins.opcode in ("bitcast", "copy", "reshape", "convert") and ins.operands:
        ins = comp.instrs.get(ins.operands[0])
    if ins is None or ins.opcode != "constant" or not re.fullmatch(r"-?\d+", ins.args.strip()):
        return None
    return int(ins.args.strip())


def upper_bound(comp: Comp, name: str, comps: dict[str, Comp], outer: list[tuple[Comp, Instr]],
                 depth: int = 0) -> int | None:
    """An upper bound of a scalar integer value, when its definition caps it: a constant, minimum(..., capped),
    select / maximum of capped values, through views and into (and out of) fusions; None otherwise."""
    ins = comp.instrs.get(name)
    if ins is None or depth > 32:
        return None
    if ins.opcode in ("bitcast", "copy", "reshape", "convert", "broadcast") and ins.operands:
        return upper_bound(comp, ins.operands[0], comps, outer, depth + 1)
    if ins.opcode == "constant":
        return constant(comp, name)
    bounds = [upper_bound(comp, o, comps, outer, depth + 1) for o in ins.operands] if ins.opcode in (
        "minimum", "maximum", "select", "clamp") else []
    if ins.opcode == "minimum":
        known = [b for b in bounds if b is not None]
        return min(known) if known else None
    if ins.opcode in ("maximum", "select"):
        branches = bounds if ins.opcode == "maximum" else bounds[1:]
        return None if any(b is None for b in branches) else max(branches)
    if ins.opcode == "clamp" and len(bounds) == 3:
        return bounds[2]
    if ins.opcode == "fusion":
        m = re.search(r"calls=%([\w.\-]+)", ins.attrs)
        fused = comps.get(m.group(1)) if m else None
        if fused is None or fused.root is None:
            return None
        return upper_bound(fused, fused.root.name, comps, [*outer, (comp, ins)], depth + 1)
    if ins.opcode == "get-tuple-element" and ins.operands and not outer:
        src = comp.instrs.get(ins.operands[0])
        k = tuple_index(ins)
        if src is not None and src.opcode == "parameter" and k is not None:
            # a loop-invariant element of a while body's state: its value where the loop starts
            callers = [(c, i) for c in comps.values() for i in c.instrs.values()
                       if i.opcode == "while" and re.search(rf"body=%{re.escape(comp.name)}\b", i.attrs)]
            root = comp.root
            invariant = root is not None and root.opcode == "tuple" and k < len(root.operands) and \
                comp.instrs.get(root.operands[k]) is ins
            if len(callers) == 1 and invariant:
                parent, loop = callers[0]
                init = parent.instrs.get(loop.operands[0]) if loop.operands else None
                if init is not None and init.opcode == "tuple" and k < len(init.operands):
                    return upper_bound(parent, init.operands[k], comps, [], depth + 1)
        return None
    if ins.opcode == "parameter" and outer and ins.args.strip().isdigit():
        parent, call = outer[-1]
        i = int(ins.args.strip())
        return upper_bound(parent, call.operands[i], comps, outer[:-1], depth + 1) if i < len(call.operands) \
            else None
    return None


def tuple_index(ins: Instr) -> int | None:
    m = re.search(r"index=(\d+)", ins.attrs)
    return int(m.group(1)) if m else None


def trip_count(loop: Instr, parent: Comp, comps: dict[str, Comp]) -> tuple[int | None, str]:
    """(trip count, how it was found) of a while instruction of ``parent`` (module docstring)."""
    m = TRIP.search(loop.attrs)
    if m:
        return int(m.group(1)), "known_trip_count"
    cond_name, _ = loop_parts(loop)
    cond = comps[cond_name]
    root = cond.root
    compare, operands = root, list(root.operands) if root is not None else []
    if root is not None and root.opcode == "fusion":  # XLA:CPU wraps the compare: read it inside
        m = re.search(r"calls=%([\w.\-]+)", root.attrs)
        fused = comps.get(m.group(1)) if m else None
        compare = fused.root if fused is not None else None
        if compare is not None and compare.opcode == "compare":
            params = [fused.instrs.get(o) for o in compare.operands]
            if not all(p is not None and p.opcode == "parameter" for p in params):
                return None, "data-dependent"
            operands = [root.operands[int(p.args)] for p in params]
    if compare is None or compare.opcode != "compare" or len(operands) != 2:
        return None, "data-dependent"
    direction = re.search(r"direction=(\w+)", compare.attrs)
    a, b = (cond.instrs.get(o) for o in operands)
    if direction is None or a is None or b is None:
        return None, "data-dependent"
    d = direction.group(1)
    if d in ("GT", "GE"):  # N > i: swap
        a, b = b, a
        d = {"GT": "LT", "GE": "LE"}[d]
    if d not in ("LT", "LE") or a.opcode != "get-tuple-element":
        return None, "data-dependent"
    limit = constant(cond, b.name)
    k = tuple_index(a)
    if k is None or (limit is None and b.opcode != "get-tuple-element"):
        return None, "data-dependent"
    init = parent.instrs.get(loop.operands[0]) if loop.operands else None
    if init is None or init.opcode != "tuple" or k >= len(init.operands):
        return None, "data-dependent"
    start = constant(parent, init.operands[k])
    if start is None:
        return None, "data-dependent"
    extra = 1 if d == "LE" else 0
    if limit is not None:
        return max(limit - start + extra, 0), "condition"
    # i < n with n a loop-carried value: bounded when n = minimum(..., constant) (a data-dependent count with a cap,
    # as the decode attention's chunk loop: stop at the longest sequence, at most the table's chunks): the cap
    j = tuple_index(b) if b.opcode == "get-tuple-element" else None
    cap = upper_bound(parent, init.operands[j], comps, []) if j is not None and j < len(init.operands) else None
    if cap is None:
        return None, "data-dependent"
    return max(cap - start + extra, 0), "bound"
