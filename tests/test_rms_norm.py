"""RMSNorm primitives of the triton backend against `torch_impl` in float64 (dX only: frozen weight), and
the `rms_norm` op against timm's `RmsNorm` and `torch.nn.RMSNorm` (output, input gradient, no weight
gradient)."""
import pytest
import torch
from timm.layers import LayerNorm, RmsNorm, RmsNorm2d

from utils import assert_close, assert_flash_rule
from vpt_fast.backends import backend_module, torch_impl
from vpt_fast.ops.rms_norm import is_rms_norm, rms_norm

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
OP_BACKENDS = ["torch", "triton"]
# `impl` (the triton backend module) comes from conftest.py


def _inputs(shape, dtype, affine, strided, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    if strided:  # rows with a stride larger than C: a slice of a wider buffer
        x = (torch.randn(*shape[:-1], C + 9, generator=g) * 3 + 1)[..., :C]
    else:
        x = torch.randn(*shape, generator=g) * 3 + 1
    w = torch.randn(C, generator=g) if affine else None
    dy = torch.randn(*shape, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(dy)


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


def _backend(name):
    if backend_module(name) is None:
        pytest.skip(f"{name} backend not available")
    return name


def test_torch_impl_is_torch_rms_norm():
    """The specification against torch.rms_norm and its autograd in float64."""
    x, w, dy = _f64(*_inputs((4, 6, 24), torch.float32, True, True, device="cpu"))
    y, rstd = torch_impl.rms_norm_fwd(x, w, 1e-6)
    xr = x.detach().clone().requires_grad_()
    want = torch.rms_norm(xr, [24], w, 1e-6)
    assert y.dtype == torch.float64 and rstd.shape == x.shape[:-1] and rstd.dtype == torch.float64
    assert_close(y, want, 1e-12, 1e-12, "y")
    assert_close(torch_impl.rms_norm_bwd(dy, x, w, rstd), torch.autograd.grad(want, xr, dy)[0], 1e-12, 1e-12, "dx")


@pytest.mark.parametrize("shape", [(3, 5, 40), (7, 33), (2, 3, 4, 17), (1, 768)])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm_fp32(impl, shape, affine, strided):
    x, w, dy = _inputs(shape, torch.float32, affine, strided)
    y, rstd = impl.rms_norm_fwd(x, w, 1e-6)
    xr, wr, dyr = _f64(x, w, dy)
    yr, rstdr = torch_impl.rms_norm_fwd(xr, wr, 1e-6)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert rstd.shape == x.shape[:-1] and rstd.dtype == torch.float32
    assert_close(y, yr, 1e-5, 1e-5, "y")
    assert_close(rstd, rstdr, 1e-5, 1e-5, "rstd")
    dx = impl.rms_norm_bwd(dy, x, w, rstd)
    dxr = torch_impl.rms_norm_bwd(dyr, xr, wr, rstdr)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(dx, dxr, 1e-5, 1e-5, "dx")


def _check_low_precision(impl, shape, dtype, device, atol=1e-3):
    x, w, dy = _inputs(shape, dtype, True, True, device=device, seed=1)
    xr, wr, dyr = _f64(x, w, dy)
    yr, rstdr = torch_impl.rms_norm_fwd(xr, wr, 1e-5)
    dxr = torch_impl.rms_norm_bwd(dyr, xr, wr, rstdr)
    # Baseline: eager PyTorch in the same precision (timm's RmsNorm arithmetic with autograd).
    xe = x.detach().clone().requires_grad_()
    ye = xe * torch.rsqrt(xe.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    (dxe,) = torch.autograd.grad(ye, xe, dy)
    y, rstd = impl.rms_norm_fwd(x, w, 1e-5)
    dx = impl.rms_norm_bwd(dy, x, w, rstd)
    assert_flash_rule(y, yr, ye, "y", atol=atol)
    assert_flash_rule(dx, dxr, dxe, "dx", atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_low_precision_small(impl, dtype):
    # Triton's interpreter truncates fp32 -> bf16 stores (GPUs round to nearest): allow 1 bf16 ulp.
    _check_low_precision(impl, (3, 5, 40), dtype, DEVICE, atol=3e-2 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_low_precision_torch(dtype):
    _check_low_precision(torch_impl, (3, 5, 40), dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 257, 1024), (8, 197, 768), (4, 50, 1536)])
def test_rms_norm_gpu(impl, dtype, shape):
    _check_low_precision(impl, shape, dtype, "cuda")


def test_rms_norm_bad_inputs(impl):
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(TypeError, match="x dtype"):
        impl.rms_norm_fwd(x.double(), None, 1e-5)
    with pytest.raises(ValueError, match="weight must have shape"):
        impl.rms_norm_fwd(x, torch.ones(7, device=DEVICE), 1e-5)
    with pytest.raises(TypeError, match="eps must be a number"):
        impl.rms_norm_fwd(x, None, None)
    y, rstd = impl.rms_norm_fwd(x, None, 1e-5)
    with pytest.raises(ValueError, match="dy must have"):
        impl.rms_norm_bwd(x[:2], x, None, rstd)
    with pytest.raises(ValueError, match="rstd must be"):
        impl.rms_norm_bwd(x, x, None, rstd[:2])
    with pytest.raises(TypeError, match="expected timm RmsNorm"):
        rms_norm(x, torch.nn.LayerNorm(8), "torch")


def test_rms_norm_torch_compile(impl):
    x, w, dy = _inputs((3, 5, 40), torch.float32, True, False)

    def f(x, w, dy):
        y, rstd = impl.rms_norm_fwd(x, w, 1e-6)
        return y, impl.rms_norm_bwd(dy, x, w, rstd)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor" if HAS_CUDA else "aot_eager", fullgraph=True)
    for name, got, want in zip(("y", "dx"), compiled(x, w, dy), f(x, w, dy)):
        assert_close(got, want, 1e-6, 1e-6, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_out_dtype(impl, dtype):
    """fp32 rows normalised straight into the low dtype equal the fp32 result cast once (the interpreter
    truncates instead of rounding bf16 stores: 1 ulp there); dy read in its own dtype equals dy upcast."""
    x, w, dy = _inputs((3, 5, 40), torch.float32, True, True, seed=2)
    y_low, rstd = impl.rms_norm_fwd(x, w, 1e-6, dtype)
    assert y_low.dtype == dtype and y_low.shape == x.shape
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert_close(y_low.float(), impl.rms_norm_fwd(x, w, 1e-6)[0].to(dtype).float(), 0.0,
                 0.0 if HAS_CUDA else ulp * 1.01, "y")
    dx_low = impl.rms_norm_bwd(dy.to(dtype), x, w, rstd)
    assert dx_low.dtype == torch.float32
    assert torch.equal(dx_low, impl.rms_norm_bwd(dy.to(dtype).float(), x, w, rstd))


def _modules():
    """(name, frozen norm over 40 channels) for every form the op accepts, weights away from 1."""
    mods = {"timm": RmsNorm(40, eps=1e-6), "timm_no_affine": RmsNorm(40, affine=False),
            "torch": torch.nn.RMSNorm(40, eps=1e-5), "torch_eps_none": torch.nn.RMSNorm(40),
            "torch_no_affine": torch.nn.RMSNorm([40], eps=1e-6, elementwise_affine=False)}
    g = torch.Generator().manual_seed(5)
    for m in mods.values():
        if m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(1 + 0.5 * torch.randn(40, generator=g))
        m.requires_grad_(False)
    return mods


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("name", list(_modules()))
def test_rms_norm_op_equals_module(backend, name):
    """rms_norm(x, norm) equals norm(x) and its input gradient equals autograd's through norm(x), to
    fp32 rounding, on odd and non-contiguous rows; the frozen weight gets no gradient."""
    norm = _modules()[name]
    _backend(backend)
    x, _, dy = _inputs((3, 7, 40), torch.float32, False, True, device="cpu", seed=3)
    x = x.transpose(0, 1).requires_grad_()  # non-contiguous leading dims as well
    dy = dy.transpose(0, 1)
    y = rms_norm(x, norm, backend)
    want = norm(x)
    assert y.dtype == want.dtype == torch.float32
    assert_close(y, want, 1e-6, 1e-6, "y")
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_want,) = torch.autograd.grad(want, x, dy)
    assert_close(dx, dx_want, 1e-5, 1e-5, "dx")
    y = rms_norm(x, norm, backend)
    assert type(y.grad_fn).__name__ == "FrozenRmsNormBackward"
    y.backward(dy)
    assert norm.weight is None or norm.weight.grad is None


def test_rms_norm_op_float64_exact():
    norm = _modules()["torch_eps_none"].double()
    x = (torch.randn(5, 9, 40, dtype=torch.float64) * 2).requires_grad_()
    dy = torch.randn(5, 9, 40, dtype=torch.float64)
    y, want = rms_norm(x, norm, "torch"), norm(x)
    assert_close(y, want, 1e-12, 1e-12, "y")
    assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(want, x, dy)[0], 1e-12, 1e-12, "dx")


@pytest.mark.parametrize("cls", ["timm", "torch"])
def test_rms_norm_trainable_weight_takes_autograd(cls):
    """An unfrozen weight is not dropped: the module's own forward runs and the weight gets its gradient."""
    norm = (RmsNorm(40) if cls == "timm" else torch.nn.RMSNorm(40)).requires_grad_(True)
    x = torch.randn(2, 3, 40, requires_grad=True)
    y = rms_norm(x, norm, "torch")
    assert_close(y, norm(x), 0, 0, "y")
    y.sum().backward()
    assert norm.weight.grad is not None and x.grad is not None


def test_is_rms_norm():
    assert is_rms_norm(RmsNorm(8)) and is_rms_norm(torch.nn.RMSNorm(8)) and is_rms_norm(torch.nn.RMSNorm([8]))
    assert not is_rms_norm(torch.nn.RMSNorm([4, 8]))  # over two dims
    assert not is_rms_norm(RmsNorm2d(8)) and not is_rms_norm(LayerNorm(8)) and not is_rms_norm(torch.nn.Identity())

    class OwnForward(torch.nn.RMSNorm):
        def forward(self, x):
            return super().forward(x) * 2

    assert not is_rms_norm(OwnForward(8))


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_under_autocast(backend, x_dtype):
    """Under autocast the rows and weight (a bf16 model's too) run in float32, as CUDA autocast runs
    timm's RmsNorm; `feeds_matmul` writes the float32 result once in the autocast dtype; dX comes back
    in the rows' dtype with the gradient of the float32 norm."""
    _backend(backend)
    norm = _modules()["timm"].bfloat16()
    x = (torch.randn(4, 7, 40) * 2 + 1).to(x_dtype).requires_grad_()
    dy = torch.randn(4, 7, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rms_norm(x, norm, backend)
        y_low = rms_norm(x, norm, backend, feeds_matmul=True)
    x32 = x.detach().float().requires_grad_()
    want = torch.rms_norm(x32, [40], norm.weight.float(), norm.eps)
    assert y.dtype == torch.float32 and y_low.dtype == torch.bfloat16
    bf16_ulp = 2.0 ** -7 * 1.01  # one bf16 rounding: the interpreter truncates bf16 stores
    assert_close(y, want, 1e-5, 1e-5, "y")
    assert_close(y_low.float(), want.bfloat16().float(), 0.0, bf16_ulp, "y_low")
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_want,) = torch.autograd.grad(want, x32, dy)
    assert dx.dtype == x_dtype
    assert_close(dx.float(), dx_want.to(x_dtype).float(), 1e-5, 1e-5 if x_dtype == torch.float32 else bf16_ulp, "dx")


def test_rms_norm_double_backward_raises():
    norm = _modules()["timm"]
    x = torch.randn(3, 40, requires_grad=True)
    (dx,) = torch.autograd.grad(rms_norm(x, norm, "torch").pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        dx.sum().backward()
