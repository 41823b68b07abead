"""Will a config fit a target? Compile its programs for the target's devices and report memory and cost.

    JAX_PLATFORMS=cpu python scripts/plan.py --config=configs/qwen7b.py --target=tpu-v5p-8 [--json F]
    JAX_PLATFORMS=cpu python scripts/plan.py --config=configs/qwen7b.py --target=h100-80gb-8 [--json F]

See ``poer_jax/plan/cli.py``. TPU and GPU targets compile for the real chips through libtpu and JAX's CUDA plugin
(``JAX_PLATFORMS=cpu``: neither opens a device); host CPU devices for cpu-N targets must exist before JAX starts, so
the target is read here first.
"""

import os
import sys


def _host_devices(argv: list[str]) -> int:
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--target=")), None)
    if name is None and "--target" in argv and argv.index("--target") + 1 < len(argv):
        name = argv[argv.index("--target") + 1]
    digits = (name or "").rsplit("-", 1)[-1]
    return max(int(digits), 8) if digits.isdigit() else 8


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    n = _host_devices(sys.argv[1:])
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from poer_jax.plan.cli import main

    sys.exit(main())
