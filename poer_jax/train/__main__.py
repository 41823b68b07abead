"""``python -m poer_jax.train --config=configs/NAME.py [--config.KEY=VALUE ...]``"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from poer_jax.system.config import (
    ConfigError,
    apply_overrides,
    config_from_argv,
    describe,
    load_config_file,
    parse_argv,
)

USAGE = """usage: python -m poer_jax.train --config=configs/NAME.py [--config.KEY=VALUE ...] [--help]

Trains a Qwen-architecture model with POER (rollout.strategy=poer) or GRPO/DAPO (rollout.strategy=full).
A run lives in its workdir: rerunning the same command continues it from its newest intact checkpoint;
--config.overwrite=true moves an old run aside and starts over.

Exit status: 0 finished (or already complete), 1 internal error (a bug: the traceback is printed),
2 bad config or input, or a workdir the run may not use (nothing was trained), 3 the run stopped on an
error while training (a reward function with reward.on_error=raise, dynamic sampling giving up, a
non-finite train state), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Checkpoints already written
are kept in every case.
"""
HELP_KEYS = "\nConfig keys{} (value, help; [resume-safe]: may change when a run is resumed):\n"

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_RUN, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption), handled like Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def _help(argv: list[str]) -> int:
    """``--help``; with ``--config=FILE`` (and overrides) it shows that config's values."""
    rest = [a for a in argv if a not in ("-h", "--help")]
    path, overrides = parse_argv(rest)
    cfg = apply_overrides(load_config_file(path), overrides) if path else None
    print(USAGE + HELP_KEYS.format(f" of {path}" if path else "") + describe(cfg))
    return EXIT_OK


def _setup_logging() -> None:
    from poer_jax.console import TqdmLoggingHandler

    handler = TqdmLoggingHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    if not any(isinstance(h, TqdmLoggingHandler) for h in root.handlers):
        root.addHandler(handler)
    root.setLevel(logging.WARNING)  # orbax and absl stay at WARNING
    logging.getLogger("poer_jax").setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn goes through the same handler: never glued onto a bar


def _error(message: object) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _interrupted(workdir: Path, code: int) -> int:
    from poer_jax.train.run_dir import checkpoint_steps

    steps = checkpoint_steps(workdir)
    where = (f"its newest checkpoint is step {steps[-1]}: rerun the same command to continue from it" if steps
             else "it had no checkpoint yet: rerunning the same command starts it again")
    what = "interrupted" if code == EXIT_INTERRUPTED else "terminated"
    print(f"\n{what}: the run in {workdir} stopped; {where}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv:
            print(USAGE + HELP_KEYS.format("") + describe())
            return EXIT_INPUT
        if "-h" in argv or "--help" in argv:
            return _help(argv)
        cfg = config_from_argv(argv)  # fails before any work: unknown keys, bad values, reward imports
    except ConfigError as e:
        _error(e)
        return EXIT_INPUT
    _setup_logging()
    from poer_jax.model.config import ModelConfigError
    from poer_jax.model.safetensors_io import WeightFileError
    from poer_jax.platforms import use_present_platforms
    from poer_jax.rl.dynamic_sampling import DynamicSamplingError
    from poer_jax.system.data import DataError
    from poer_jax.system.multihost import initialize_from_env
    from poer_jax.train.checkpoint import NonFiniteCheckpointError
    from poer_jax.train.loop import PoerTrainer
    from poer_jax.train.reward_pool import RewardFunctionError

    use_present_platforms()  # libtpu / the CUDA plugin installed without their hardware: do not start them
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        initialize_from_env()  # multi-host: one process per host, the same command everywhere
        with PoerTrainer(cfg) as trainer:  # closes the checkpointer and workers on every way out
            trainer.run()
    except (ConfigError, DataError, ModelConfigError, WeightFileError) as e:
        _error(e)
        return EXIT_INPUT
    except (RewardFunctionError, DynamicSamplingError, NonFiniteCheckpointError) as e:
        _error(e)
        return EXIT_RUN
    except Terminated:
        return _interrupted(Path(cfg.workdir), EXIT_TERMINATED)
    except KeyboardInterrupt:
        return _interrupted(Path(cfg.workdir), EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
