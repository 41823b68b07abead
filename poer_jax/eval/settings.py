"""The prompt and sampling settings a model was trained and evaluated with, saved next to its export.

``eval_settings.json`` in an exported HF directory lets ``python -m poer_jax.evaluate --model <export>``
build the same prompts (system prompt, chat template, prompt length, column names) and sample the same
way (k, temperature, top-p, max new tokens, seed) as the training run's held-out evaluation, so it reports
the accuracy the run printed. Command-line flags still take precedence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections

from poer_jax.system.data import OPEN_RS_SYSTEM_PROMPT

FILE = "eval_settings.json"


def eval_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings of a (resolved: toy paths filled in) training config, flat, named like the evaluator's
    flags (``system_prompt`` is the prompt actually used, the default spelled out)."""
    d, e = cfg.data, cfg.eval
    return {
        "system_prompt": OPEN_RS_SYSTEM_PROMPT if d.system_prompt is None else d.system_prompt,
        "chat_template": d.chat_template,
        "max_prompt_len": d.max_prompt_len,
        "problem_key": d.problem_key,
        "solution_key": d.solution_key,
        "answer_key": d.answer_key,
        "data": d.eval_path,
        "limit": d.eval_limit,
        "k": e.num_samples,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "max_new_tokens": e.max_new_tokens or cfg.rollout.max_completion_len,
        "seed": cfg.seed,
        "dtype": cfg.model.param_dtype,
    }


def write_eval_settings(directory: str | Path, cfg: ml_collections.ConfigDict) -> Path:
    path = Path(directory) / FILE
    path.write_text(json.dumps(eval_settings(cfg), indent=2) + "\n")
    return path


def read_eval_settings(directory: str | Path) -> dict[str, Any]:
    """The saved settings of an export, ``{}`` when it has none (an HF model from elsewhere)."""
    path = Path(directory) / FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
