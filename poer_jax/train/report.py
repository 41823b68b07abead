"""What a run hands its user at the end and along the way: the exported model (with the settings to
evaluate it the same way), the end-of-run summary, and sample completions."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from poer_jax.console import format_duration
from poer_jax.system.data import TokenizedPrompts
from poer_jax.train.metrics import METRICS_FILE, read_metrics
from poer_jax.train.rollout import Rollout

ADAPTER_DIR = "adapter"  # export/adapter/: a LoRA run's adapters in PEFT's layout (not beside config.json, where
# transformers would take the directory for an adapter and load its base instead of the merged weights)


def export_run(final: Path, params: Any, mcfg: Any, cfg: ml_collections.ConfigDict, *, adapters: Any = None,
               lora: Any = None) -> Path:
    """``final`` as an HF directory plus ``eval_settings.json`` (the run's prompt and evaluation settings);
    written next to it and renamed into place, so a kill leaves the old export or none, never half of one.
    A LoRA run (``adapters`` on the host, ``lora`` their LoraConfig) exports the merged weights as ``params`` and
    its adapters in PEFT's layout in ``final/adapter`` (``model.peft_io``; base: ``model.path``)."""
    from poer_jax.eval.settings import write_eval_settings
    from poer_jax.model import export_hf
    from poer_jax.model.peft_io import export_peft

    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    export_hf(params, mcfg, tmp, tokenizer_dir=cfg.model.tokenizer_path or cfg.model.path)
    write_eval_settings(tmp, cfg)
    if adapters is not None:
        export_peft(adapters, lora, tmp / ADAPTER_DIR, base_model=cfg.model.path)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def build_summary(workdir: Path, cfg: ml_collections.ConfigDict, step: int, export: Path | None, seconds: float,
                  steps_here: int, num_eval_problems: int | None) -> dict[str, Any]:
    """The numbers of ``summary.json``; accuracies come from metrics.jsonl, so they span resumed processes."""
    path = workdir / METRICS_FILE
    rows = read_metrics(path) if path.is_file() else []
    evals = [r for r in rows if isinstance(r.get("eval/accuracy"), float | int)]
    train = [r for r in rows if "reward" in r]
    return {
        "step": step, "max_steps": cfg.train.max_steps, "seconds_this_process": round(seconds, 1),
        "steps_this_process": steps_here, "export": str(export) if export else None,
        "eval_data": cfg.data.eval_path if evals else None,
        "eval_k": cfg.eval.num_samples if evals else None,
        "eval_problems": num_eval_problems if evals else None,
        "initial_eval_accuracy": evals[0]["eval/accuracy"] if evals and evals[0]["step"] == 0 else None,
        "final_eval_accuracy": evals[-1]["eval/accuracy"] if evals else None,
        "final_reward": train[-1]["reward"] if train else None,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def summary_lines(summary: dict[str, Any], workdir: Path) -> list[str]:
    """The end-of-run summary as console lines (also shown for an already complete run)."""
    lines = [f"finished: step {summary.get('step')}/{summary.get('max_steps')} in "
             f"{format_duration(summary.get('seconds_this_process', float('nan')))}"]
    final = summary.get("final_eval_accuracy")
    if final is not None:
        start = summary.get("initial_eval_accuracy")
        lines.append(f"held-out accuracy (avg@{summary.get('eval_k')}, {summary.get('eval_problems')} problems): "
                     + (f"{start:.3f} at step 0 -> " if start is not None else "")
                     + f"{final:.3f} at step {summary.get('step')}")
    if summary.get("final_reward") is not None:
        lines.append(f"last step's mean reward: {summary['final_reward']:.3f}")
    if summary.get("export"):
        export = workdir / "export"  # where it is now (a workdir may have been moved since)
        lines.append(f"model exported to {export}")
        data = f" --data {summary['eval_data']}" if summary.get("eval_data") else " --data FILE"
        lines.append(f"evaluate it: python -m poer_jax.evaluate --model {export}{data}")
    lines.append(f"metrics: {workdir / METRICS_FILE} (plot: python scripts/plot_metrics.py {workdir})")
    return lines


PREFIX_TAIL_TOKENS = 8  # the cached prefix is shown by its length and its last few tokens


def _flat(text: str, width: int) -> str:
    flat = text.replace("\n", " \u23ce ")
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def sample_group(r: Rollout, g: int, texts: list[str], totals: np.ndarray, prompts: TokenizedPrompts,
                 tokenizer: Any, step: int, width: int = 160, *, strategy: str = "full",
                 correct: np.ndarray | None = None) -> tuple[dict[str, Any], str]:
    """Group ``g`` of a rollout as a samples.jsonl record and as console text.

    GRPO (``strategy="full"``): one shortened line per completion, its reward first; each record entry holds
    the completion's text, reward and length. POER: the G responses share the cached prefix, so it is shown
    once, by its length and its last ``PREFIX_TAIL_TOKENS`` tokens, then one line per continuation (the part
    that differs) with its reward and whether it was right (``correct``: per completion, NaN / None where
    it was not graded); the record holds ``prefix`` (text, length, tail) once and per completion the
    continuation, its length, reward and correctness."""
    G, question = r.group_size, int(r.indices[g])
    row = prompts.rows([question])[0]
    prefix_ids = r.prefix_ids[g]
    prefix_len = int(len(prefix_ids))
    reward = [float(totals[i]) if np.isfinite(totals[i]) else None for i in range(g * G, (g + 1) * G)]
    record: dict[str, Any] = {"question": question, "prompt": prompts.texts[question], "answer": row.get("answer")}
    head = f"sample at step {step}: question {question}, gold {row.get('answer')!r}"
    if strategy != "poer":
        record["completions"] = [
            {"text": texts[i], "reward": reward[i - g * G], "length": int(r.response_lengths[i]),
             "prefix_length": prefix_len,
             "continuation": tokenizer.decode(r.continuation_ids[i].tolist(), skip_special_tokens=True)}
            for i in range(g * G, (g + 1) * G)]
        lines = [head]
        for c in record["completions"]:
            shown = "  nan" if c["reward"] is None else f"{c['reward']:5.2f}"
            lines.append(f"  [{shown}] {_flat(c['text'], width)}")
        return record, "\n".join(lines)
    tail = tokenizer.decode(prefix_ids[-PREFIX_TAIL_TOKENS:].tolist(), skip_special_tokens=True)
    record["prefix"] = {"length": prefix_len, "tail": tail,
                        "text": tokenizer.decode(prefix_ids.tolist(), skip_special_tokens=True)}
    record["completions"] = []
    lines = [head, f"  cached prefix: {prefix_len} tokens" + (
        f", ending {'...' if prefix_len > PREFIX_TAIL_TOKENS else ''}{_flat(tail, width)!r}" if prefix_len else
        " (an empty cache row, or the whole answer truncated: the continuations are whole answers)")]
    for i in range(g * G, (g + 1) * G):
        right = None if correct is None or not np.isfinite(correct[i]) else bool(correct[i] > 0.5)
        continuation = tokenizer.decode(r.continuation_ids[i].tolist(), skip_special_tokens=True)
        record["completions"].append({"continuation": continuation, "length": int(len(r.continuation_ids[i])),
                                      "reward": reward[i - g * G], "correct": right})
        shown = "  nan" if reward[i - g * G] is None else f"{reward[i - g * G]:5.2f}"
        verdict = {True: "right", False: "wrong", None: "  -  "}[right]
        lines.append(f"  [{shown} {verdict}] +{len(r.continuation_ids[i])} tokens: {_flat(continuation, width)}")
    return record, "\n".join(lines)


def log_already_complete(workdir: Path, step: int | None, summary: dict[str, Any] | None, max_steps: int) -> None:
    """What a start in a finished run's workdir says: the run's summary and how to go on."""
    log = logging.getLogger("poer_jax")
    log.info("the run in %s is already complete (step %s of train.max_steps=%d); nothing to do", workdir, step,
             max_steps)
    for line in summary_lines(summary or {}, workdir)[1:]:
        log.info("%s", line)
    log.info("raise --config.train.max_steps to train further, or --config.overwrite=true to start over")
