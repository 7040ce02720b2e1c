"""Test configuration: Triton runs under its CPU interpreter when no GPU is present; tests marked
`gpu` are skipped without one (markers are registered in pyproject.toml)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def impl():
    """The triton backend's primitives module (skips when triton cannot run here)."""
    from vpt_fast.backends import triton_impl
    if not triton_impl.AVAILABLE:
        pytest.skip("triton backend not available")
    return triton_impl
