"""Shared test set-up: fp32 matmuls pinned to full precision in both frameworks (as the harness does)."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import pytest  # noqa: E402

from compare import env, vectors  # noqa: E402

env.pin_precision()


@pytest.fixture(scope="session")
def all_vectors():
    return {v.name: v for v in vectors.load_all()}
