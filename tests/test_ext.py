"""The C++/CUDA extension `vpt_fast._C` (csrc/, backend module `vpt_fast.backends.cuda_impl`): it is
built as `ext_info()` reports, its operators are registered with the schemas the backend calls (the
prompt-set index and the mutated qkv gradient included), and a CUDA build holds its architectures.
The attention cases (CPU twin and CUDA kernels against torch_impl) are in tests/test_attention.py.
"""
import os

import pytest
import torch

cuda_impl = pytest.importorskip("vpt_fast.backends.cuda_impl")
needs_ext = pytest.mark.skipif(not cuda_impl.AVAILABLE, reason="vpt_fast._C is not built")


def test_ext_info_reports_the_build():
    info = cuda_impl.ext_info()
    for key in ("built", "cuda", "archs", "torch", "torch_cuda", "error"):
        assert key in info
    if os.environ.get("VPT_FAST_REQUIRE_EXT") == "1":  # CI: the install must have built it
        assert info["built"], info["error"]
    if not info["built"]:
        assert info["error"] and not cuda_impl.AVAILABLE
        pytest.skip(f"vpt_fast._C not built: {info['error']}")
    assert info["compiled_torch"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert info["archs"], "a CUDA build lists its architectures"
        assert info["compiled_cuda"]


@needs_ext
def test_ops_are_registered():
    assert hasattr(torch.ops.vpt_fast, "attention_fwd") and hasattr(torch.ops.vpt_fast, "attention_bwd")
    schema = str(torch.ops.vpt_fast.attention_fwd.default._schema)
    assert "Tensor? pk" in schema and "Tensor? bias=None" in schema


@needs_ext
def test_schema_has_the_index_and_the_mutated_qkv_gradient():
    fwd = str(torch.ops.vpt_fast.attention_fwd.default._schema)
    bwd = str(torch.ops.vpt_fast.attention_bwd.default._schema)
    assert "Tensor? prompt_index=None" in fwd and "Tensor? prompt_index=None" in bwd
    assert "Tensor(a!)? dqkv=None" in bwd
    assert torch.ops.vpt_fast.attention_bwd.default._schema.is_mutable


def _cuda_ready():
    if not (cuda_impl.AVAILABLE and cuda_impl.WITH_CUDA):
        pytest.skip("vpt_fast._C built without CUDA kernels")


@pytest.mark.gpu
def test_cuda_archs_compiled_in():
    _cuda_ready()
    info = cuda_impl.ext_info()
    major, minor = torch.cuda.get_device_capability()
    want = {"sm_80"} | ({"sm_90a"} if major == 9 else set())
    own = {f"sm_{major}{minor}{suffix}" for suffix in ("", "a", "f")}  # a build for this device only
    assert want <= set(info["archs"]) or own & set(info["archs"]), info
