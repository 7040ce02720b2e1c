"""The backend registry: names, availability, "auto" and the per-op fallback chain."""
import pytest
import torch

import vpt_fast
from vpt_fast import backends
from vpt_fast.backends import torch_impl
from vpt_fast.config import PromptConfig


def test_validate_backend_names_and_availability(monkeypatch):
    for name in ("auto", "reference", "torch"):
        assert backends.validate_backend(name) == name
    with pytest.raises(ValueError, match="backend must be one of .*got 'trition'"):
        backends.validate_backend("trition")
    with pytest.raises(ValueError, match="backend must be one of"):
        PromptConfig(backend="fast")
    monkeypatch.setitem(backends._LOADED, "cuda", None)
    monkeypatch.setitem(backends._REASONS, "cuda", "vpt_fast._C did not import (test)")
    with pytest.raises(RuntimeError, match=r"'cuda' is not available .*\(test\); available: \['reference', 'torch'"):
        backends.validate_backend("cuda")
    assert "cuda" not in vpt_fast.available_backends()


def test_available_backends_is_the_registry():
    assert vpt_fast.available_backends is backends.available_backends
    names = backends.available_backends()
    assert names[:2] == ["reference", "torch"]
    for name in names:
        assert backends.validate_backend(name) == name


def test_auto_and_fallback_chain():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert backends.resolve_auto("auto", cpu) == "torch"
    expected_cuda = "triton" if backends.backend_module("triton") is not None else "torch"
    assert backends.resolve_auto("auto", cuda) == expected_cuda
    assert backends.resolve_auto("cuda", cpu) == "cuda"
    assert backends.resolve("auto", "layer_norm", cpu) is torch_impl
    cuda_impl = backends.backend_module("cuda")
    if cuda_impl is not None:  # the extension brings attention only
        assert backends.resolve("cuda", "attention", cpu) is cuda_impl
        assert backends.resolve("cuda", "layer_norm", cpu) is torch_impl
        assert backends.resolve("cuda", "bias_gelu", cuda) is (backends.backend_module("triton") or torch_impl)
    with pytest.raises(ValueError, match="got 'reference'"):
        backends.resolve("reference", "attention", cpu)
