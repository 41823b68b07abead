"""What a part of the trainer hands the plan command: one compiled program, described abstractly.

Each part that owns jitted programs (the sampler, the update step) provides a function returning
``ProgramSpec``s for a config on a mesh; the plan lowers ``fn`` with ``args`` (pytrees of
``jax.ShapeDtypeStruct`` carrying shardings: nothing is allocated), compiles it for the target, and reads
the compiled program's per-device memory and cost. Nothing here runs a program.

A leaf module: the sampler and the update step (core packages) describe their programs with it, and the plan
(``poer_jax.plan``, above them) reads them, so it imports nothing of poer_jax.
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
    resident: the arguments that are long-lived buffers, live between calls and during every other program
        (weights, optimizer state, KV pool): resident-set name (``RESIDENT_*``) -> argument position (int)
        or keyword (str). The plan counts each named buffer once in the resident set, at the largest size
        any program passes for it; the program's other arguments are its own (transient) memory.
    released: resident buffers the run frees while this program runs (the trainer drops the sampler's
        weights and KV pool for the log-prob pass and the update: ``ROLLOUT_BUFFERS``).
    dims: the work of one call, for pricing a training step from per-call costs (``plan/step_cost.py``):
        prefill {'devices', 'prompts' (per device), 'prompt_tokens'}; decode {'devices', 'slots' (per device,
        one token each per decode step), 'context_tokens' (a slot's page-table capacity)}; log-probs and update
        {'rows', 'seq_len'} over all devices.
    """

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    sizing_keys: tuple[str, ...] = ()
    num_shapes: int = 1
    note: str = ""
    resident: dict[str, int | str] = dataclasses.field(default_factory=dict)
    released: tuple[str, ...] = ()
    dims: dict[str, int] = dataclasses.field(default_factory=dict)


# Names of the resident buffers, shared by every part's program specs.
RESIDENT_TRAIN_STATE = "train/state"  # fp32 master weights (LoRA: the adapters) + Adam moments (+ step)
RESIDENT_REF_PARAMS = "train/ref_params"  # the KL reference policy (loss.beta > 0)
RESIDENT_BASE_PARAMS = "train/base_params"  # LoRA's frozen base weights (compute dtype; also the KL reference)
RESIDENT_SAMPLER_PARAMS = "sampler/params"  # the sampler's own copy of the weights, when it has one
RESIDENT_KV_POOL = "sampler/kv_pool"  # the paged KV pool (and the sampler's per-slot state)
ROLLOUT_BUFFERS = (RESIDENT_SAMPLER_PARAMS, RESIDENT_KV_POOL)  # live during the rollout only (GroupSampler.release)
RESIDENT_CACHE_POOL = "poer/cache_pool"  # POER's cache pool of answers
