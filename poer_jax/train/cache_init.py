"""The cache pool's first answers (paper Algorithm 1, line 1), by ``cache.init``:

* ``solutions``: each question's reference solution, written as the warm start writes its answers (a built-in
  task's R1 format: a cut then falls where the policy's own answers could be cut), else the dataset's solution;
* ``file``: answers from ``cache.init_file`` (``poer.load_answers_file``: by row or by problem text);
* ``sample``: one answer per question from the initial policy, in chunks of at most ``questions_per_step x
  group_size`` questions of equal size (one compiled program for every chunk); on several processes each samples
  its share of every chunk on its own devices. Question q's answer is drawn from ``fold_in(key', q)``, so the pool
  does not depend on the chunks or the number of processes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from poer_jax import poer
from poer_jax.console import TaskProgress
from poer_jax.sampler.pages import cdiv, even_batches
from poer_jax.system.multihost import ProcessRows, is_main_process
from poer_jax.system.start import warm_start_target

log = logging.getLogger("poer_jax")

_insert = jax.jit(poer.insert)


def initial_cache_pool(cfg: ml_collections.ConfigDict, pool: poer.CachePool, prompts: Any, tokenizer: Any,
                       eos_id: int, pad_id: int, mesh: jax.sharding.Mesh, *, sampler: Any = None,
                       key: jax.Array | None = None, rows: ProcessRows | None = None) -> poer.CachePool:
    """``pool`` (empty, of the run's shape and sharding) filled as ``cfg.cache.init`` says; ``sampler``, ``key``
    and ``rows`` (this process's share of a batch) are needed by ``sample`` only."""
    c, n = cfg.cache, len(prompts)
    records = prompts.rows(range(n))
    sharding = poer.pool_sharding(pool, mesh)
    if c.init == "solutions":
        texts = [warm_start_target(r, cfg) if r.get("solution") or r.get("answer") else "" for r in records]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos_id] for t in texts]
        pool = poer.from_token_lists(ids, pool.max_len, pad_id, eos_id, sharding=sharding)
        log.info("cache pool: %d reference solutions, %.1f tokens on average", n, np.mean([len(x) for x in ids]))
        return pool
    if c.init == "file":
        mapping = poer.load_answers_file(c.init_file, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                                         num_questions=n, problems=[r["problem"] for r in records])
        return poer.from_token_lists(mapping, pool.max_len, pad_id, eos_id, num_questions=n, sharding=sharding)
    assert sampler is not None and key is not None and rows is not None, "cache.init=sample needs the sampler"
    t0 = time.perf_counter()
    chunk = cfg.data.questions_per_step * cfg.rollout.group_size
    key = jax.random.fold_in(key, -1 & 0x7FFFFFFF)
    width, P, p = pool.max_len, rows.count, rows.index
    bar = TaskProgress("cache pool", n, unit="answers", quiet=not is_main_process())
    for start, stop in even_batches(n, chunk):
        idx = np.arange(start, stop)
        share = cdiv(len(idx), P)
        mine = idx[p * share: (p + 1) * share]
        tokens = np.full((share, width), pad_id, np.int32)
        lengths = np.zeros((share,), np.int32)
        if mine.size:
            out = sampler.generate([prompts.ids[i].tolist() for i in mine], 1, width, key, group_offset=int(mine[0]))
            tokens[: mine.size, : out.tokens.shape[1]] = out.tokens[:, :width]
            lengths[: mine.size] = out.lengths
        which = np.full((share,), -1, np.int32)  # -1: a padding row, dropped by the pool's writers
        which[: mine.size] = mine
        pool = _insert(pool, rows.to_global(which, fill=-1), rows.to_global(tokens, fill=pad_id),
                       rows.to_global(lengths))
        bar.update(stop)
    bar.close()
    log.info("cache pool: %d answers sampled in %.1fs", n, time.perf_counter() - t0)
    return pool
