"""A tiny tokenizer built locally with the ``tokenizers`` library (no download), for the toy task.

Character level by default: every printable ASCII character (plus newline and tab, plus any other
character of the corpus) is one token, so ``decode(encode(text)) == text`` exactly and digits stay
separate tokens (arithmetic is learnable by a 2-layer model). With ``vocab_size`` above the alphabet, a
byte-pair model is trained on the corpus instead. No normaliser, no pre-tokeniser, a ``Fuse`` decoder:
nothing rewrites whitespace.

Special tokens (ids 0..3): ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) as in Qwen,
and ``<|unk|>`` for characters outside the vocabulary (without it they would vanish silently).

The directory written is loadable by transformers: ``tokenizer.json`` and ``tokenizer_config.json``
(tokenizer class ``PreTrainedTokenizerFast``, eos / pad tokens, ``clean_up_tokenization_spaces=False``,
and a Qwen-style jinja chat template, also written to ``chat_template.jinja`` where transformers >= 5
looks for it). Its generation prompt is ``"<|im_start|>assistant\\n<think>\\n"``, as in R1-distilled
models, so completions are ``"<work>\\n</think>\\n\\boxed{answer}<|im_end|>"``.

Load it with ``load_tiny_tokenizer(path)`` (``PreTrainedTokenizerFast.from_pretrained``), not
``AutoTokenizer``, once a model ``config.json`` saying ``qwen2`` sits in the same directory:
AutoTokenizer then picks Qwen2's tokenizer class, which may swap in Qwen's byte-level pre-tokenizer
and break the character-level round trip.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, trainers

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "load_tiny_tokenizer",
    "make_tiny_tokenizer",
]

PAD_TOKEN, IM_START, EOS_TOKEN, UNK_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN, UNK_TOKEN)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)

_BASE_ALPHABET = sorted(set(string.printable) - set("\r\x0b\x0c"))


def _alphabet(corpus: list[str]) -> list[str]:
    extra = sorted({ch for text in corpus for ch in text} - set(_BASE_ALPHABET))
    return _BASE_ALPHABET + extra


def make_tiny_tokenizer(
    out_dir: str | Path, corpus_texts: Iterable[str], vocab_size: int | None = None,
    word_tokens: Sequence[str] = (),
) -> Path:
    """Build, save and return the path of a tiny tokenizer for ``corpus_texts``.

    vocab_size None (or exactly the alphabet size): character level. Larger: byte-pair merges trained
    on the corpus up to ``vocab_size`` tokens. Smaller than specials + alphabet: ValueError.
    ``word_tokens``: strings that become one (non-special) token each wherever they occur, as
    ``</think>`` is one token of the R1-distilled models' tokenizer; the round trip stays exact.
    """
    from transformers import PreTrainedTokenizerFast

    corpus = [str(t) for t in corpus_texts]
    alphabet = _alphabet(corpus)
    base = len(SPECIAL_TOKENS) + len(alphabet)
    if vocab_size is not None and vocab_size < base:
        raise ValueError(f"vocab_size={vocab_size} is below the {base} special + character tokens")
    if vocab_size is None or vocab_size == base:
        vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *alphabet])}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
        tok.add_special_tokens(list(SPECIAL_TOKENS))
    else:
        tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=alphabet,
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer)
    tok.decoder = decoders.Fuse()
    words = [w for w in dict.fromkeys(word_tokens) if w]
    if any(len(w) < 2 or w in SPECIAL_TOKENS for w in words):
        raise ValueError(f"word_tokens must be strings of 2+ characters other than the special tokens, got {words}")
    tok.add_tokens([AddedToken(w, normalized=False, special=False) for w in words])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # A config any transformers >= 4.51 reads the same way (v5 writes its own backend class name and
    # keeps the template in chat_template.jinja only).
    cfg_path = out / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg.update(
        tokenizer_class="PreTrainedTokenizerFast",
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
        chat_template=CHAT_TEMPLATE,
    )
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def load_tiny_tokenizer(path: str | Path) -> Any:
    """Load a tokenizer directory written by ``make_tiny_tokenizer`` (PreTrainedTokenizerFast)."""
    from transformers import PreTrainedTokenizerFast

    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise ValueError(f"{p}: no tokenizer.json (write one with make_tiny_tokenizer)")
    return PreTrainedTokenizerFast.from_pretrained(str(p))
