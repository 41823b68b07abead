"""Input checks that run before any heavy work (toy-task generation, warm start, model load, compilation).

Each check is cheap (file existence, a config.json, safetensors headers and sizes, the data rows) and
raises :class:`ConfigError` naming the config key, then the file and, for data, the row. What can only be
checked on the loaded values (NaN weights) is checked at load (``model.load_hf``).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from poer_jax.model.config import ModelConfigError
from poer_jax.model.safetensors_io import WeightFileError
from poer_jax.system.config import ConfigError
from poer_jax.system.data import ColumnMap, DataError, MathDataset, load_dataset_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_dir(path: str, key: str = "model.path") -> None:
    """An HF model directory that exists, has a readable Qwen config.json whose architectures match its
    model_type, and complete weight files holding every tensor the config implies."""
    from poer_jax.model.weights import check_hf_dir

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"config key {key!r}: model directory {p} does not exist")
    if not (p / "config.json").is_file():
        found = sorted(x.name for x in p.iterdir())[:8]
        raise ConfigError(f"config key {key!r}: {p} has no config.json, so it is not an HF model directory "
                          f"(it holds {found or 'nothing'})")
    try:
        check_hf_dir(p)
    except (ModelConfigError, WeightFileError) as e:
        raise ConfigError(f"config key {key!r}: {e}") from e


def check_tokenizer_dir(path: str, key: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"config key {key!r}: tokenizer directory {p} does not exist")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"config key {key!r}: {p} holds no tokenizer ({', '.join(TOKENIZER_FILES)})")


def column_map(cfg: ml_collections.ConfigDict) -> ColumnMap:
    return ColumnMap(problem=cfg.data.problem_key, solution=cfg.data.solution_key, answer=cfg.data.answer_key)


def load_data(cfg: ml_collections.ConfigDict, key: str, limit: int | None = None) -> MathDataset:
    """Load the file at config key ``key`` (data.train_path / data.eval_path); errors name the key, the
    file and the row."""
    path = cfg.data[key.split(".")[1]]
    try:
        return load_dataset_file(path, column_map(cfg), limit=limit)
    except DataError as e:
        raise DataError(f"config key {key!r}: {e}") from e


def check_inputs(cfg: ml_collections.ConfigDict) -> None:
    """Everything the run reads that is given by the user, checked before anything is generated or loaded.

    With ``toy.enabled`` the model, tokenizer and (unless given) data are generated, so only what the user
    set is checked here; the generated files are checked when they are read.
    """
    for key in ("data.train_path", "data.eval_path"):
        value = cfg.data[key.split(".")[1]]
        if value is not None and not Path(value).exists():
            raise ConfigError(f"config key {key!r}: {value} does not exist")
    if cfg.cache.init == "file" and not Path(cfg.cache.init_file).is_file():
        raise ConfigError(f"config key 'cache.init_file': {cfg.cache.init_file} does not exist")
    if cfg.toy.enabled:
        return
    if cfg.model.path is not None:
        check_model_dir(cfg.model.path)
    if cfg.model.tokenizer_path is not None:
        check_tokenizer_dir(cfg.model.tokenizer_path, "model.tokenizer_path")
    elif cfg.model.path is not None:
        check_tokenizer_dir(cfg.model.path, "model.path")
