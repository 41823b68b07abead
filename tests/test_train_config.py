"""Training config: schema defaults, validation and command-line overrides fail early, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from poer_jax.system.config import (
    SCHEMA,
    ConfigError,
    apply_overrides,
    config_from_argv,
    default_config,
    field,
    load_config_file,
    parse_value,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = validate(load_config_file(path))
    assert cfg.rollout.strategy in ("poer", "full")


def test_baselines_differ_from_poer_only_in_rollout_and_dapo_options():
    poer = load_config_file(ROOT / "configs/qwen7b.py").to_dict()
    grpo = load_config_file(ROOT / "configs/qwen7b_grpo.py").to_dict()
    dapo = load_config_file(ROOT / "configs/qwen7b_dapo.py").to_dict()

    def diff(a, b, prefix=""):
        out = set()
        for k in a:
            if isinstance(a[k], dict):
                out |= diff(a[k], b[k], f"{prefix}{k}.")
            elif a[k] != b[k]:
                out.add(prefix + k)
        return out

    assert diff(poer, grpo) == {"workdir", "rollout.strategy"}
    assert diff(poer, dapo) - {"workdir", "rollout.strategy"} <= {
        "loss.epsilon_high", "loss.aggregation", "loss.beta", "reward.overlong_buffer", "reward.dynamic_sampling",
        "reward.overlong_penalty", "reward.max_sampling_attempts", "loss.epsilon_low"}


def test_paper_settings_in_qwen7b():
    c = load_config_file(ROOT / "configs/qwen7b.py")
    assert (c.rollout.group_size, c.rollout.temperature, c.rollout.max_completion_len) == (6, 0.7, 4096)
    assert (c.cache.max_truncation, c.cache.epsilon, c.reward.alpha, c.reward.r_min, c.reward.r_max) == (
        300, 0.1, 0.01, 0.5, 1.0)
    assert c.mesh.fsdp * c.mesh.tensor == 8  # the train state over 8 devices


def test_default_config_is_locked_against_typos():
    c = default_config()
    with pytest.raises(AttributeError, match="lerning_rate"):
        c.optim.lerning_rate = 1.0


def test_unknown_key_in_config_file(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("from poer_jax.system.config import default_config\n"
                 "def get_config():\n    c = default_config()\n    c.rollout.group_sise = 4\n    return c\n")
    with pytest.raises(ConfigError, match="group_sise"):
        load_config_file(f)


@pytest.mark.parametrize("override, match", [
    ("train.max_step=3", "unknown config key 'train.max_step'"),
    ("train.max_steps=three", "'train.max_steps': cannot parse 'three' as int"),
    ("rollout.strategy=greedy", r"'rollout.strategy' must be one of \['poer', 'full'\]"),
    ("cache.epsilon=1.5", r"'cache.epsilon' must be <= 1.0"),
    ("rollout.group_size=0", r"'rollout.group_size' must be >= 1"),
    ("model.remat=maybe", "'model.remat': cannot parse 'maybe' as bool"),
    ("rollout", "must look like --config.KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        config_from_argv([f"--config={ROOT / 'configs/arithmetic.py'}", f"--config.{override}"])


def test_overrides_parse_with_declared_types():
    c = config_from_argv([f"--config={ROOT / 'configs/arithmetic.py'}", "--config.train.max_steps=7",
                          "--config.cache.truncation_fraction=0.5", "--config.optim.learning_rate=3e-4",
                          "--config.reward.functions=accuracy,format", "--config.model.remat=true",
                          "--config.data.limit=None"])
    assert c.train.max_steps == 7 and c.cache.truncation_fraction == 0.5
    assert c.optim.learning_rate == 3e-4 and c.reward.functions == ("accuracy", "format")
    assert c.model.remat is True and c.data.limit is None
    assert parse_value("rollout.temperature", "1") == 1


def test_cross_field_rules():
    c = load_config_file(ROOT / "configs/arithmetic.py")
    with pytest.raises(ConfigError, match="reward.weights"):
        validate(apply_overrides(c, ["reward.weights=(1.0, 2.0)"]))
    with pytest.raises(ConfigError, match="optim.num_minibatches"):
        validate(apply_overrides(c, ["optim.micro_batches=7"]))
    with pytest.raises(ConfigError, match="cache.init_file"):
        validate(apply_overrides(c, ["cache.init=file"]))
    mcl = c.rollout.max_completion_len
    with pytest.raises(ConfigError, match=rf"'rollout.max_continuation_len' \({mcl + 1}\) is larger than"):
        validate(apply_overrides(c, [f"rollout.max_continuation_len={mcl + 1}"]))
    with pytest.raises(ConfigError, match="'rollout.max_continuation_len' must be >= 1"):
        validate(apply_overrides(c, ["rollout.max_continuation_len=0"]))
    capped = validate(apply_overrides(c, [f"rollout.max_continuation_len={mcl}"]))
    from poer_jax.system.cache_pool import build_truncation

    assert build_truncation(capped).max_continuation == mcl and build_truncation(c).max_continuation is None
    q = load_config_file(ROOT / "configs/qwen7b.py")
    with pytest.raises(ConfigError, match="'model.path' and 'model.preset'"):
        validate(apply_overrides(q, ["model.preset=tiny"]))


def test_keys_that_would_replace_one_another_are_refused_naming_both():
    """issue 28: the demo config's warm start would replace a model.path given on the command line (and the toy
    task a model, preset or tokenizer): refused, naming both keys and the way out."""
    toy = load_config_file(ROOT / "configs/toy.py")  # toy.enabled, warm_start.path: the committed warm start
    with pytest.raises(ConfigError, match=r"'warm_start.path' and 'model.path'.*--config.warm_start.path=None"):
        validate(apply_overrides(toy, ["model.path=/some/model", "toy.enabled=false", "data.train_path=d.jsonl"]))
    with pytest.raises(ConfigError, match=r"'toy.enabled' and 'model.path'.*--config.toy.enabled=false"):
        validate(apply_overrides(toy, ["model.path=/some/model", "warm_start.path=None"]))
    for key in ("model.preset=tiny", "model.tokenizer_path=/some/tokenizer"):
        name = key.split("=")[0]
        with pytest.raises(ConfigError, match=f"'toy.enabled' and '{name}'"):
            validate(apply_overrides(toy, [key, "warm_start.path=None"]))
        with pytest.raises(ConfigError, match=f"'warm_start.path' and '{name}'"):
            validate(apply_overrides(toy, [key, "toy.enabled=false", "data.train_path=d.jsonl"]))
    # each alone is fine; warm_start.steps beside warm_start.path is a rule (the directory wins), announced
    validate(apply_overrides(toy, ["model.path=/some/model", "toy.enabled=false", "warm_start.path=None",
                                   "data.train_path=d.jsonl"]))
    assert validate(toy).warm_start.steps > 0


def test_run_sources_name_what_is_loaded_and_which_key_decided():
    from poer_jax.system.start import run_sources

    toy = validate(load_config_file(ROOT / "configs/toy.py"))
    resolved = apply_overrides(toy, ["model.path=/w/ws", "model.tokenizer_path=/w/ws", "data.train_path=/w/t.jsonl",
                                     "data.eval_path=/w/e.jsonl"])
    got = run_sources(toy, resolved)
    assert got["model"].startswith("/w/ws (warm_start.path; warm_start.steps=2000 is only what scripts/warm_start")
    assert got["tokenizer"] == "/w/ws (warm_start.path)"
    assert got["train data"] == "/w/t.jsonl (toy.enabled: the generated task)"
    mine = apply_overrides(toy, ["warm_start.path=None", "warm_start.steps=0", "data.eval_path=/mine.jsonl"])
    got = run_sources(mine, apply_overrides(mine, ["model.path=/w/toy/model", "data.train_path=/w/t.jsonl"]))
    assert got["model"] == "/w/toy/model (toy.enabled: the task's random model)"
    assert got["held-out data"] == "/mine.jsonl (data.eval_path)"
    ws = apply_overrides(mine, ["warm_start.steps=5"])
    assert "warm_start.steps=5 supervised steps from the toy task's random model" in run_sources(ws, ws)["model"]


def test_missing_or_wrong_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_from_argv([f"--config={tmp_path / 'nope.py'}"])
    with pytest.raises(ConfigError, match="missing --config"):
        config_from_argv(["--config.train.max_steps=1"])


def test_schema_covers_issue_sections():
    assert {"workdir", "seed", "model", "data", "rollout", "cache", "loss", "optim", "train", "eval",
            "mesh"} <= set(SCHEMA)


def test_every_key_has_help_text_and_unknown_keys_get_a_suggestion():
    from poer_jax.system.config import describe, keys, suggest

    missing = [k for k in keys() if not field(k).help.strip()]
    assert not missing, f"keys without help text: {missing}"
    assert suggest("optim.lerning_rate") == "; did you mean 'optim.learning_rate'?"
    assert suggest("group_size") == "; did you mean 'rollout.group_size'?"
    assert suggest("completely.unrelated") == ""
    text = describe(load_config_file(ROOT / "configs/arithmetic.py"))
    assert "rollout.group_size" in text and "[resume-safe]" in text
