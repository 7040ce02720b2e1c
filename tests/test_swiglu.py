"""SwiGLU gate primitives of the triton backend against `torch_impl` in float64, the `swiglu` op, and
`swiglu_mlp` against timm's `SwiGLU` and `GluMlp` (output, input gradient, no weight gradient)."""
import pytest
import torch
from timm.layers import GluMlp, LayerNorm, Mlp, RmsNorm, SwiGLU
from torch import nn

from utils import assert_close, assert_flash_rule
from vpt_fast.backends import backend_module, torch_impl
from vpt_fast.ops.swiglu import is_swiglu_mlp, swiglu, swiglu_mlp

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
OP_BACKENDS = ["torch", "triton"]
# `impl` (the triton backend module) comes from conftest.py


def _inputs(shape, dtype, layout, device=DEVICE, seed=0):
    """gate, up, dout; `layout`: "contiguous", "packed" (the two halves of one (..., 2C) buffer, as
    GluMlp's chunk gives them) or "strided" (slices of wider buffers)."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    if layout == "packed":
        h = torch.randn(*shape[:-1], 2 * C, generator=g) * 3
        gate, up = h[..., :C], h[..., C:]
    elif layout == "strided":
        gate = (torch.randn(*shape[:-1], C + 5, generator=g) * 3)[..., :C]
        up = torch.randn(*shape[:-1], C + 3, generator=g)[..., 3:]
    else:
        gate, up = torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g)
    dout = torch.randn(*shape, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (gate, up, dout)]


def _f64(*ts):
    return [t.double() for t in ts]


def _backend(name):
    if backend_module(name) is None:
        pytest.skip(f"{name} backend not available")
    return name


def test_torch_impl_is_autograd():
    """The specification against autograd through F.silu(gate) * up in float64."""
    gate, up, dout = _f64(*_inputs((4, 6, 24), torch.float32, "packed", device="cpu"))
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    want = nn.functional.silu(g) * u
    assert_close(torch_impl.swiglu_fwd(gate, up), want, 1e-12, 1e-12, "out")
    for name, got, ref in zip(("dgate", "dup"), torch_impl.swiglu_bwd(dout, gate, up),
                              torch.autograd.grad(want, (g, u), dout)):
        assert_close(got, ref, 1e-12, 1e-12, name)


@pytest.mark.parametrize("shape", [(3, 7, 50), (2049,), (5, 1, 3, 13)])
@pytest.mark.parametrize("layout", ["contiguous", "packed", "strided"])
def test_swiglu_fp32(impl, shape, layout):
    gate, up, dout = _inputs(shape, torch.float32, layout)
    gr, ur, dr = _f64(gate, up, dout)
    out = impl.swiglu_fwd(gate, up)
    assert out.shape == gate.shape and out.dtype == gate.dtype
    assert_close(out, torch_impl.swiglu_fwd(gr, ur), 1e-6, 1e-5, "out")
    for name, got, want in zip(("dgate", "dup"), impl.swiglu_bwd(dout, gate, up), torch_impl.swiglu_bwd(dr, gr, ur)):
        assert got.shape == gate.shape and got.dtype == gate.dtype
        assert_close(got, want, 1e-6, 1e-5, name)


def _check_low_precision(impl, shape, dtype, device, atol=1e-3):
    gate, up, dout = _inputs(shape, dtype, "packed", device=device, seed=2)
    gr, ur, dr = _f64(gate, up, dout)
    ge, ue = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    oe = nn.functional.silu(ge) * ue  # eager PyTorch in the same precision (timm's forward)
    dge, due = torch.autograd.grad(oe, (ge, ue), dout)
    assert_flash_rule(impl.swiglu_fwd(gate, up), torch_impl.swiglu_fwd(gr, ur), oe, "out", atol=atol)
    dgate, dup = impl.swiglu_bwd(dout, gate, up)
    dgr, dur = torch_impl.swiglu_bwd(dr, gr, ur)
    assert_flash_rule(dgate, dgr, dge, "dgate", atol=atol)
    assert_flash_rule(dup, dur, due, "dup", atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swiglu_low_precision_small(impl, dtype):
    # Triton's interpreter truncates fp32 -> bf16 stores (GPUs round to nearest): allow 1 bf16 ulp.
    _check_low_precision(impl, (3, 7, 50), dtype, DEVICE, atol=6e-2 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swiglu_low_precision_torch(dtype):
    _check_low_precision(torch_impl, (3, 7, 50), dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swiglu_gpu(impl, dtype):
    _check_low_precision(impl, (8, 197, 2048), dtype, "cuda")


def test_swiglu_bad_inputs(impl):
    gate = torch.randn(3, 8, device=DEVICE)
    for module in (impl, torch_impl):
        with pytest.raises(ValueError, match="up must have gate's shape"):
            module.swiglu_fwd(gate, gate[:2])
        with pytest.raises(TypeError, match="dtype"):
            module.swiglu_fwd(gate, gate.half())
        with pytest.raises(ValueError, match="dout must have"):
            module.swiglu_bwd(gate[:1], gate, gate)
    with pytest.raises(TypeError, match="gate dtype"):
        impl.swiglu_fwd(gate.double(), gate.double())
    with pytest.raises(TypeError, match="expected a timm SwiGLU"):
        swiglu_mlp(gate, Mlp(8, 16), "torch")


def test_swiglu_torch_compile(impl):
    gate, up, dout = _inputs((3, 7, 50), torch.float32, "packed")

    def f(gate, up, dout):
        return (impl.swiglu_fwd(gate, up), *impl.swiglu_bwd(dout, gate, up))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor" if HAS_CUDA else "aot_eager", fullgraph=True)
    for name, got, want in zip(("out", "dgate", "dup"), compiled(gate, up, dout), f(gate, up, dout)):
        assert_close(got, want, 1e-6, 1e-6, name)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "packed", "strided"])
@pytest.mark.parametrize("dout_dtype", [torch.float32, torch.bfloat16])
def test_swiglu_bwd_inplace(impl, backend, layout, dout_dtype):
    """`inplace=True` writes dgate / dup over gate / up (returned) with the out-of-place values, also
    for halves of one buffer, strided views and a dout in another dtype."""
    module = torch_impl if backend == "torch" else impl
    gate, up, dout = _inputs((3, 7, 50), torch.float32, layout)
    dout = dout.to(dout_dtype)
    want = module.swiglu_bwd(dout, gate, up)
    dgate, dup = module.swiglu_bwd(dout, gate, up, inplace=True)
    assert dgate.data_ptr() == gate.data_ptr() and dup.data_ptr() == up.data_ptr()
    assert torch.equal(gate, want[0]) and torch.equal(up, want[1])


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_swiglu_op_matches_autograd(backend):
    """The op `swiglu(gate, up)`: output and both gradients equal autograd's through F.silu(gate) * up."""
    _backend(backend)
    gate, up, dout = _inputs((3, 7, 50), torch.float32, "packed", device="cpu")
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = swiglu(g, u, backend)
    want = nn.functional.silu(g) * u
    assert_close(out, want, 1e-6, 1e-6, "out")
    for name, got, ref in zip(("dgate", "dup"), torch.autograd.grad(out, (g, u), dout),
                              torch.autograd.grad(want, (g, u), dout)):
        assert_close(got, ref, 1e-6, 1e-5, name)


# -- the frozen MLP ------------------------------------------------------------------------------

MLPS = {  # name: timm module over 24 channels (hidden 40 per half)
    "swiglu": lambda: SwiGLU(24, 40),
    "swiglu_no_bias": lambda: SwiGLU(24, 40, bias=False),
    "swiglu_layer_norm": lambda: SwiGLU(24, 40, norm_layer=LayerNorm),
    "swiglu_rms_norm": lambda: SwiGLU(24, 40, norm_layer=RmsNorm),
    "glu_gate_last": lambda: GluMlp(24, 80, act_layer=nn.SiLU),
    "glu_gate_first_rms": lambda: GluMlp(24, 80, act_layer=nn.SiLU, gate_last=False, norm_layer=RmsNorm),
    "glu_gate_first_layer_norm": lambda: GluMlp(24, 80, act_layer=nn.SiLU, gate_last=False, norm_layer=nn.LayerNorm),
}


def _mlp(name: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(7)
    mlp = MLPS[name]()
    with torch.no_grad():  # hidden norms away from the identity affine, so a dropped weight or bias shows
        for pname, p in mlp.norm.named_parameters():
            p.copy_((1.0 if pname == "weight" else 0.0) + 0.3 * torch.randn_like(p))
    return mlp.eval().requires_grad_(False).to(dtype)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("name", list(MLPS))
def test_swiglu_mlp_equals_module(name, backend, recompute):
    """swiglu_mlp(x, mlp) equals mlp(x) and its input gradient autograd's through mlp(x), to fp32
    rounding; one autograd node, and no parameter gets a gradient."""
    _backend(backend)
    mlp = _mlp(name)
    assert is_swiglu_mlp(mlp)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(7, 3, 24, generator=g) * 2).transpose(0, 1).requires_grad_()  # non-contiguous rows
    dout = torch.randn(3, 7, 24, generator=g)
    out = swiglu_mlp(x, mlp, backend, recompute=recompute)
    want = mlp(x)
    assert out.dtype == want.dtype and out.shape == want.shape
    assert_close(out, want, 1e-6, 1e-5, "out")
    assert type(out.grad_fn).__name__ == "FrozenSwiGluMlpBackward"
    (dx,) = torch.autograd.grad(out, x, dout)
    (dx_want,) = torch.autograd.grad(want, x, dout)
    assert_close(dx, dx_want, 1e-6, 1e-5, "dx")
    swiglu_mlp(x, mlp, backend, recompute=recompute).backward(dout)
    assert all(p.grad is None for p in mlp.parameters())


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("name", ["swiglu_rms_norm", "glu_gate_last", "glu_gate_first_layer_norm"])
def test_swiglu_mlp_float64_exact(name, recompute):
    mlp = _mlp(name, torch.float64)
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, 5, 24, dtype=torch.float64)
    out, want = swiglu_mlp(x, mlp, "torch", recompute=recompute), mlp(x)
    assert_close(out, want, 1e-12, 1e-12, "out")
    assert_close(torch.autograd.grad(out, x, dout)[0], torch.autograd.grad(want, x, dout)[0], 1e-12, 1e-12, "dx")


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # timm's RmsNorm under autocast
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("name", ["swiglu", "glu_gate_first_rms"])
def test_swiglu_mlp_under_autocast(name, recompute):
    """Under CPU bf16 autocast: the GEMMs in bf16 as autocast runs them, output in bf16; dX in x's float32,
    within bf16 rounding of autograd's through mlp(x) under the same autocast."""
    mlp = _mlp(name)
    x = torch.randn(3, 7, 24, requires_grad=True)
    dout = torch.randn(3, 7, 24).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = swiglu_mlp(x, mlp, "torch", recompute=recompute)
        want = mlp(x)
    assert out.dtype == want.dtype == torch.bfloat16
    (dx,) = torch.autograd.grad(out, x, dout)
    (dx_want,) = torch.autograd.grad(want, x, dout)
    assert dx.dtype == torch.float32
    scale = want.float().abs().max().item()
    assert_close(out.float(), want.float(), 2 ** -6 * scale, 0.0, "out")
    assert_close(dx, dx_want, 2 ** -6 * dx_want.abs().max().item(), 0.0, "dx")


def test_is_swiglu_mlp():
    assert is_swiglu_mlp(_mlp("swiglu")) and is_swiglu_mlp(_mlp("glu_gate_first_rms"))
    assert not is_swiglu_mlp(Mlp(24, 48).requires_grad_(False))
    assert not is_swiglu_mlp(GluMlp(24, 80).requires_grad_(False))  # sigmoid GLU
    assert not is_swiglu_mlp(GluMlp(24, 80, act_layer=nn.SiLU, use_conv=True).requires_grad_(False))
    assert not is_swiglu_mlp(SwiGLU(24, 40, act_layer=nn.GELU).requires_grad_(False))
    assert not is_swiglu_mlp(SwiGLU(24, 40, norm_layer=nn.BatchNorm1d).requires_grad_(False))
    assert not is_swiglu_mlp(SwiGLU(24, 40))  # trainable
    dropping = SwiGLU(24, 40, drop=0.1).requires_grad_(False)
    assert not is_swiglu_mlp(dropping.train()) and is_swiglu_mlp(dropping.eval())


def test_swiglu_mlp_runs_the_module_when_not_frozen():
    """A trainable MLP (or an active dropout) takes the module's own forward: its weights get gradients."""
    mlp = SwiGLU(24, 40, norm_layer=RmsNorm).eval()
    x = torch.randn(2, 5, 24, requires_grad=True)
    out = swiglu_mlp(x, mlp, "torch")
    assert torch.equal(out, mlp(x))
    out.sum().backward()
    assert all(p.grad is not None for p in mlp.parameters())


def test_swiglu_mlp_double_backward_raises():
    mlp = _mlp("swiglu")
    x = torch.randn(3, 24, requires_grad=True)
    (dx,) = torch.autograd.grad(swiglu_mlp(x, mlp, "torch").pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        dx.sum().backward()
