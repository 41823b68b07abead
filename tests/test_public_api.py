"""The public API re-exported from poer_jax resolves, lazily."""

import subprocess
import sys

import poer_jax


def test_every_public_name_resolves():
    for name in poer_jax.__all__:
        assert getattr(poer_jax, name) is not None, name
    assert poer_jax.update_cache is __import__("poer_jax.poer", fromlist=["update"]).update


def test_import_is_lazy():
    out = subprocess.run([sys.executable, "-c", "import sys, poer_jax; print('jax' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
