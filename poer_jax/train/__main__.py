"""``python -m poer_jax.train --config=configs/NAME.py [--config.KEY=VALUE ...]``"""

from __future__ import annotations

import logging
import sys

from poer_jax.train.config import ConfigError, config_from_argv, describe

USAGE = """usage: python -m poer_jax.train --config=configs/NAME.py [--config.KEY=VALUE ...]

Trains a Qwen-architecture model with POER (rollout.strategy=poer) or GRPO/DAPO (rollout.strategy=full).
Config keys (default, help):
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + describe())
        return 0 if argv else 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("poer_jax").setLevel(logging.INFO)  # orbax and absl stay at WARNING
    try:
        cfg = config_from_argv(argv)  # fails before any work: unknown keys, bad values
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from poer_jax.model.config import ModelConfigError
    from poer_jax.model.safetensors_io import WeightFileError
    from poer_jax.rl.dynamic_sampling import DynamicSamplingError
    from poer_jax.train.data import DataError
    from poer_jax.train.loop import PoerTrainer
    from poer_jax.train.multihost import initialize_from_env
    from poer_jax.train.setup import skip_absent_tpu

    skip_absent_tpu()  # libtpu installed on a CPU host: do not start the TPU runtime
    try:
        initialize_from_env()  # multi-host: one process per host, the same command everywhere
        trainer = PoerTrainer(cfg)
        trainer.run()
    except (ConfigError, DataError, ModelConfigError, WeightFileError, DynamicSamplingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
