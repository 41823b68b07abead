"""Shared fixtures. 8 host CPU devices for mesh tests: XLA_FLAGS must be set before jax is imported."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

from tests.hf_fixtures import make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_qwen2_dir(tmp_path_factory):
    """Tiny random Qwen2 (untied embeddings, q/k/v bias)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", tied=False, seed=0)


@pytest.fixture(scope="session")
def hf_qwen2_tied_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("qwen2_tied"), "qwen2", tied=True, seed=1)


@pytest.fixture(scope="session")
def hf_qwen3_dir(tmp_path_factory):
    """Tiny random Qwen3 with head_dim (24) != hidden / heads (64 / 4)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", tied=True, seed=2)
