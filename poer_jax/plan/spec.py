"""What a part of the trainer hands the plan command: one compiled program, described abstractly.

Each part that owns jitted programs (the sampler, the update step) provides a function returning
``ProgramSpec``s for a config on a mesh; the plan lowers ``fn`` with ``args`` (pytrees of
``jax.ShapeDtypeStruct`` carrying shardings: nothing is allocated), compiles it for the target, and reads
the compiled program's per-device memory and cost. Nothing here runs a program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """name: e.g. 'sampler/prefill', 'sampler/decode', 'train/logprobs', 'train/update'.
    fn: a ``jax.jit``-wrapped callable (static arguments already bound), lowered as ``fn.lower(*args, **kwargs)``.
    args / kwargs: abstract arguments (``jax.ShapeDtypeStruct`` leaves with ``sharding=NamedSharding``).
    sizing_keys: the config keys that size this program, named when it does not fit.
    num_shapes: how many distinct shapes of this program a run compiles (its compile budget).
    note: one line on the shape it was built at (e.g. 'B=96 rows x T=4608').
    """

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    sizing_keys: tuple[str, ...] = ()
    num_shapes: int = 1
    note: str = ""
