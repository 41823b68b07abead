"""Tokenizer and prompts from the config: the tokenizer with its EOS and pad ids (``build_text``), and the
training (and held-out) rows with their tokenized prompts (``build_prompts``). Errors name the config key,
then the file and the row."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections

from poer_jax.system import preflight
from poer_jax.system.config import ConfigError
from poer_jax.system.data import DataError, PromptConfig, TokenizedPrompts, tokenize_prompts


def load_tokenizer(path: str | Path) -> Any:
    """A transformers tokenizer from a local directory.

    A directory whose tokenizer_config.json names ``PreTrainedTokenizerFast`` is loaded with that class:
    ``AutoTokenizer`` would swap in Qwen's own tokenizer class when config.json says qwen2.
    """
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"tokenizer directory {p} does not exist (config key 'model.tokenizer_path')")
    tc = p / "tokenizer_config.json"
    try:
        if tc.is_file() and json.loads(tc.read_text()).get("tokenizer_class") == "PreTrainedTokenizerFast":
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(str(p))
        else:  # AutoTokenizer imports transformers' model configs, and with them torch when installed (~3 s)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: cannot load a tokenizer ({e})") from e
    if len(tok) == 0 or not tok("1 + 1")["input_ids"]:
        raise ConfigError(f"{p}: the tokenizer is empty (no tokenizer.json / vocab files in the directory?)")
    return tok


def eos_and_pad(tokenizer: Any, model_dir: str | Path | None) -> tuple[tuple[int, ...], int]:
    """EOS ids (tokenizer's plus generation_config.json's) and the pad id (pad token, else the first EOS)."""
    eos: list[int] = []
    if tokenizer.eos_token_id is not None:
        eos.append(int(tokenizer.eos_token_id))
    if model_dir is not None and (Path(model_dir) / "generation_config.json").is_file():
        gen = json.loads((Path(model_dir) / "generation_config.json").read_text()).get("eos_token_id")
        for e in gen if isinstance(gen, list) else [gen]:
            if e is not None and int(e) not in eos:
                eos.append(int(e))
    if not eos:
        raise ConfigError("the tokenizer has no EOS token and generation_config.json names none")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return tuple(eos), int(pad)


@dataclasses.dataclass(frozen=True)
class TextSide:
    """Tokenizer, its EOS ids and pad id."""

    tokenizer: Any
    eos_ids: tuple[int, ...]
    pad_id: int


def build_text(cfg: ml_collections.ConfigDict) -> TextSide:
    tok_path = cfg.model.tokenizer_path or cfg.model.path
    if tok_path is None:
        raise ConfigError("config key 'model.tokenizer_path' is required with model.preset")
    tokenizer = load_tokenizer(tok_path)
    eos_ids, pad_id = eos_and_pad(tokenizer, cfg.model.path)
    return TextSide(tokenizer, eos_ids, pad_id)


@dataclasses.dataclass
class Prompts:
    """The training rows and their tokenized prompts; the held-out prompts when evaluation is on."""

    train_rows: Any
    train: TokenizedPrompts
    eval: TokenizedPrompts | None


def build_prompts(cfg: ml_collections.ConfigDict, tokenizer: Any) -> Prompts:
    """Load and tokenize the training (and held-out) rows; errors name the config key, the file and the row."""
    pcfg = PromptConfig(chat_template=cfg.data.chat_template, max_prompt_len=cfg.data.max_prompt_len,
                        on_too_long=cfg.data.on_too_long,
                        **({"system_prompt": cfg.data.system_prompt} if cfg.data.system_prompt is not None else {}))
    rows = preflight.load_data(cfg, "data.train_path", limit=cfg.data.limit)
    train = _tokenize(tokenizer, rows, pcfg, "data.train_path")
    if len(train) < cfg.data.questions_per_step:
        raise ConfigError(
            f"config key 'data.questions_per_step' is {cfg.data.questions_per_step}, but data.train_path "
            f"({cfg.data.train_path}) has only {len(train)} usable rows" +
            (f" ({train.num_skipped} skipped as longer than data.max_prompt_len)" if train.num_skipped else ""))
    held_out = None
    if cfg.data.eval_path and cfg.eval.enabled:
        eval_rows = preflight.load_data(cfg, "data.eval_path", limit=cfg.data.eval_limit)
        held_out = _tokenize(tokenizer, eval_rows, pcfg, "data.eval_path")
    return Prompts(rows, train, held_out)


def _tokenize(tokenizer: Any, rows: Any, pcfg: PromptConfig, key: str) -> TokenizedPrompts:
    try:
        return tokenize_prompts(tokenizer, rows, pcfg)
    except DataError as e:
        raise DataError(f"config key {key!r}: {e}") from e
    except ValueError as e:  # chat_template='always' without a template
        raise ConfigError(f"config key 'data.chat_template': {e}") from e
