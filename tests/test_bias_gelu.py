"""Fused bias + exact GELU primitives of the triton backend against `torch_impl` in float64."""
import pytest
import torch

from utils import assert_close, assert_flash_rule
from vpt_fast.backends import torch_impl

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# `impl` (the triton backend module) comes from conftest.py


def _inputs(shape, dtype, with_bias, device=DEVICE, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=g) * 3
    if noncontig:
        h = torch.randn(*shape[:-1], shape[-1] + 5, generator=g)[..., :shape[-1]] * 3
    b = torch.randn(shape[-1], generator=g) if with_bias else None
    dg = torch.randn(*shape, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(h), cast(b), cast(dg)


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


@pytest.mark.parametrize("shape", [(3, 7, 50), (2049,), (5, 1, 3, 13)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("noncontig", [False, True])
def test_bias_gelu_fp32(impl, shape, with_bias, noncontig):
    h, b, dg = _inputs(shape, torch.float32, with_bias, noncontig=noncontig)
    hr, br, dgr = _f64(h, b, dg)
    g = impl.bias_gelu_fwd(h, b)
    assert g.shape == h.shape and g.dtype == h.dtype
    assert_close(g, torch_impl.bias_gelu_fwd(hr, br), 1e-6, 1e-5, "gelu")
    dh = impl.bias_gelu_bwd(dg, h, b)
    assert dh.shape == h.shape and dh.dtype == h.dtype
    assert_close(dh, torch_impl.bias_gelu_bwd(dgr, hr, br), 1e-6, 1e-5, "dh")


def _check_low_precision(impl, shape, dtype, device, atol=1e-3):
    h, b, dg = _inputs(shape, dtype, True, device=device, seed=2)
    hr, br, dgr = _f64(h, b, dg)
    he = h.detach().clone().requires_grad_()
    ge = torch.nn.functional.gelu(he + b)  # eager PyTorch in the same precision
    (dhe,) = torch.autograd.grad(ge, he, dg)
    assert_flash_rule(impl.bias_gelu_fwd(h, b), torch_impl.bias_gelu_fwd(hr, br), ge, "gelu", atol=atol)
    assert_flash_rule(impl.bias_gelu_bwd(dg, h, b), torch_impl.bias_gelu_bwd(dgr, hr, br), dhe, "dh",
                      atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_gelu_low_precision_small(impl, dtype):
    # Triton's interpreter truncates fp32 -> bf16 stores (GPUs round to nearest): allow 1 bf16 ulp.
    _check_low_precision(impl, (3, 7, 50), dtype, DEVICE, atol=3e-2 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_gelu_gpu(impl, dtype):
    _check_low_precision(impl, (8, 197, 3072), dtype, "cuda")


def test_bias_gelu_bad_inputs(impl):
    h = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="bias must have shape"):
        impl.bias_gelu_fwd(h, torch.ones(3, device=DEVICE))
    with pytest.raises(TypeError, match="h dtype"):
        impl.bias_gelu_fwd(h.double(), None)
    with pytest.raises(ValueError, match="dg must have"):
        impl.bias_gelu_bwd(h[:1], h, None)


def test_bias_gelu_torch_compile(impl):
    h, b, dg = _inputs((3, 7, 50), torch.float32, True)

    def f(h, b, dg):
        return impl.bias_gelu_fwd(h, b), impl.bias_gelu_bwd(dg, h, b)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor" if HAS_CUDA else "aot_eager", fullgraph=True)
    for name, got, want in zip(("gelu", "dh"), compiled(h, b, dg), f(h, b, dg)):
        assert_close(got, want, 1e-6, 1e-6, name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_gelu_bwd_inplace(impl, backend, with_bias):
    module = torch_impl if backend == "torch" else impl
    h, b, dg = _inputs((3, 7, 50), torch.float32, with_bias)
    expected = module.bias_gelu_bwd(dg, h, b)
    buffer = dg.clone()
    dh = module.bias_gelu_bwd(buffer, h, b, inplace=True)
    assert dh.data_ptr() == buffer.data_ptr(), "inplace=True must write into dg"
    torch.testing.assert_close(dh, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_gelu_fwd_inplace_writes_h(impl, backend, with_bias):
    """`inplace=True` (inference: nothing reads h afterwards) returns h itself, holding the same values
    as the out-of-place call."""
    module = torch_impl if backend == "torch" else impl
    h, b, _ = _inputs((3, 7, 50), torch.float32, with_bias)
    expected = module.bias_gelu_fwd(h, b)
    g = module.bias_gelu_fwd(h, b, inplace=True)
    assert g.data_ptr() == h.data_ptr()
    assert torch.equal(g, expected)


@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_gelu_op_matches_autograd_and_leaves_the_frozen_bias(with_bias):
    """The op (`vpt_fast.ops.bias_gelu.bias_gelu`, torch backend): output and dh equal autograd's
    through `F.gelu(h + bias)`; the frozen bias gets no gradient, a trainable one takes autograd's path."""
    from vpt_fast.ops.bias_gelu import bias_gelu
    h, b, dg = _inputs((3, 7, 50), torch.float64, with_bias, device="cpu")
    h.requires_grad_()
    g = bias_gelu(h, b, backend="torch")
    want = torch.nn.functional.gelu(h if b is None else h + b)
    assert_close(g, want, 1e-12, 1e-12, "gelu")
    assert_close(torch.autograd.grad(g, h, dg)[0], torch.autograd.grad(want, h, dg)[0], 1e-12, 1e-12, "dh")
    if with_bias:
        trainable = b.clone().requires_grad_()
        bias_gelu(h, trainable, backend="torch").sum().backward()
        assert trainable.grad is not None
