"""LayerNorm primitives of the triton backend against `torch_impl` in float64 (dX only: frozen affine)."""
import pytest
import torch

from utils import assert_close, assert_flash_rule
from vpt_fast.backends import torch_impl

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# `impl` (the triton backend module) comes from conftest.py


def _inputs(shape, dtype, affine, strided, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    if strided:  # rows with a stride larger than C: a slice of a wider buffer
        x = (torch.randn(*shape[:-1], C + 9, generator=g) * 3 + 1)[..., :C]
    else:
        x = torch.randn(*shape, generator=g) * 3 + 1
    w = torch.randn(C, generator=g) if affine in ("w", "wb") else None
    b = torch.randn(C, generator=g) if affine == "wb" else None
    dy = torch.randn(*shape, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(dy)


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


@pytest.mark.parametrize("shape", [(3, 5, 40), (7, 33), (2, 3, 4, 17), (1, 768)])
@pytest.mark.parametrize("affine", ["none", "w", "wb"])
@pytest.mark.parametrize("strided", [False, True])
def test_layer_norm_fp32(impl, shape, affine, strided):
    x, w, b, dy = _inputs(shape, torch.float32, affine, strided)
    y, mean, rstd = impl.layer_norm_fwd(x, w, b, 1e-6)
    xr, wr, br, dyr = _f64(x, w, b, dy)
    yr, meanr, rstdr = torch_impl.layer_norm_fwd(xr, wr, br, 1e-6)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert mean.shape == x.shape[:-1] and mean.dtype == torch.float32 and rstd.dtype == torch.float32
    assert_close(y, yr, 1e-5, 1e-5, "y")
    assert_close(mean, meanr, 1e-5, 1e-5, "mean")
    assert_close(rstd, rstdr, 1e-5, 1e-5, "rstd")
    dx = impl.layer_norm_bwd(dy, x, w, mean, rstd)
    dxr = torch_impl.layer_norm_bwd(dyr, xr, wr, meanr, rstdr)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(dx, dxr, 1e-5, 1e-5, "dx")


def _check_low_precision(impl, shape, dtype, device, atol=1e-3):
    x, w, b, dy = _inputs(shape, dtype, "wb", True, device=device, seed=1)
    xr, wr, br, dyr = _f64(x, w, b, dy)
    yr, meanr, rstdr = torch_impl.layer_norm_fwd(xr, wr, br, 1e-5)
    dxr = torch_impl.layer_norm_bwd(dyr, xr, wr, meanr, rstdr)
    # Baseline: eager PyTorch in the same precision (F.layer_norm with autograd).
    xe = x.detach().clone().requires_grad_()
    ye = torch.nn.functional.layer_norm(xe, (shape[-1],), w, b, 1e-5)
    (dxe,) = torch.autograd.grad(ye, xe, dy)
    y, mean, rstd = impl.layer_norm_fwd(x, w, b, 1e-5)
    dx = impl.layer_norm_bwd(dy, x, w, mean, rstd)
    assert_flash_rule(y, yr, ye, "y", atol=atol)
    assert_flash_rule(dx, dxr, dxe, "dx", atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_low_precision_small(impl, dtype):
    # Triton's interpreter truncates fp32 -> bf16 stores (GPUs round to nearest): allow 1 bf16 ulp.
    _check_low_precision(impl, (3, 5, 40), dtype, DEVICE, atol=3e-2 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 197, 768), (8, 49, 96), (4, 50, 1024)])
def test_layer_norm_gpu(impl, dtype, shape):
    _check_low_precision(impl, shape, dtype, "cuda")


def test_layer_norm_bad_inputs(impl):
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(TypeError, match="x dtype"):
        impl.layer_norm_fwd(x.double(), None, None, 1e-5)
    with pytest.raises(ValueError, match="weight must have shape"):
        impl.layer_norm_fwd(x, torch.ones(7, device=DEVICE), None, 1e-5)
    y, mean, rstd = impl.layer_norm_fwd(x, None, None, 1e-5)
    with pytest.raises(ValueError, match="dy must have"):
        impl.layer_norm_bwd(x[:2], x, None, mean, rstd)
    with pytest.raises(ValueError, match="rstd must be"):
        impl.layer_norm_bwd(x, x, None, mean, rstd[:2])


def test_layer_norm_torch_compile(impl):
    x, w, b, dy = _inputs((3, 5, 40), torch.float32, "wb", False)

    def f(x, w, b, dy):
        y, mean, rstd = impl.layer_norm_fwd(x, w, b, 1e-6)
        return y, impl.layer_norm_bwd(dy, x, w, mean, rstd)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor" if HAS_CUDA else "aot_eager", fullgraph=True)
    for name, got, want in zip(("y", "dx"), compiled(x, w, b, dy), f(x, w, b, dy)):
        assert_close(got, want, 1e-6, 1e-6, name)


def _out_dtype_case(impl, dtype, device):
    x, w, b, dy = _inputs((3, 5, 40), torch.float32, "wb", True, device=device, seed=2)
    y_low, mean, rstd = impl.layer_norm_fwd(x, w, b, 1e-6, dtype)
    y = impl.layer_norm_fwd(x, w, b, 1e-6)[0]
    assert y_low.dtype == dtype and y_low.shape == x.shape
    dy_low = dy.to(dtype)
    dx_low = impl.layer_norm_bwd(dy_low, x, w, mean, rstd)
    assert dx_low.dtype == torch.float32
    # dy read in its own dtype equals dy upcast first: the same values enter the fp32 math
    assert torch.equal(dx_low, impl.layer_norm_bwd(dy_low.float(), x, w, mean, rstd))
    return y_low, y.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_out_dtype(impl, dtype):
    """fp32 rows normalised straight into the low dtype equal the fp32 result cast once (the
    interpreter truncates instead of rounding bf16 stores: 1 ulp there; exact on GPU below)."""
    got, want = _out_dtype_case(impl, dtype, DEVICE)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    assert_close(got.float(), want.float(), 0.0, ulp * 1.01, "y")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_out_dtype_gpu(impl, dtype):
    got, want = _out_dtype_case(impl, dtype, "cuda")
    assert torch.equal(got, want)


def test_layer_norm_out_dtype_torch():
    got, want = _out_dtype_case(torch_impl, torch.bfloat16, "cpu")
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_norm_feeding_matmul_under_autocast(backend):
    """layer_norm(feeds_matmul=True) under autocast: output in the autocast dtype with the values of
    the float32 LayerNorm cast once (what the consuming linear would do), same input gradient."""
    from vpt_fast.backends import backend_module
    from vpt_fast.ops.layer_norm import layer_norm
    if backend_module(backend) is None:
        pytest.skip(f"{backend} backend not available")
    torch.manual_seed(3)
    norm = torch.nn.LayerNorm(40).requires_grad_(False)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = (torch.randn(4, 7, 40) * 2 + 1).requires_grad_()
    dy = torch.randn(4, 7, 40).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_low = layer_norm(x, norm, backend, feeds_matmul=True)
        y = layer_norm(x, norm, backend)
    assert y_low.dtype == torch.bfloat16 and y.dtype == torch.float32
    (dx_low,) = torch.autograd.grad(y_low, x, dy)
    (dx,) = torch.autograd.grad(y.bfloat16(), x, dy)
    assert torch.equal(dx_low, dx)
    if backend == "torch":
        assert torch.equal(y_low, y.bfloat16())
    else:  # the interpreter truncates bf16 stores
        assert_close(y_low.float(), y.bfloat16().float(), 0.0, 2.0 ** -7 * 1.01, "y")


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_norm_half_affine_under_autocast(backend, x_dtype):
    """A bf16 model's LayerNorm under autocast (`model.to(torch.bfloat16)`, then autocast): rows and
    affine both run in float32, as CUDA autocast runs layer_norm (the torch backend met float32 rows
    with the bf16 affine and raised 'mixed dtype'); dX comes back in the rows' dtype."""
    from vpt_fast.backends import backend_module
    from vpt_fast.ops.layer_norm import layer_norm
    if backend_module(backend) is None:
        pytest.skip(f"{backend} backend not available")
    torch.manual_seed(4)
    norm = torch.nn.LayerNorm(40).requires_grad_(False)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    norm = norm.bfloat16()
    x = (torch.randn(4, 7, 40) * 2 + 1).to(x_dtype).requires_grad_()
    dy = torch.randn(4, 7, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer_norm(x, norm, backend)
        y_low = layer_norm(x, norm, backend, feeds_matmul=True)
    x32 = x.detach().float().requires_grad_()
    want = torch.nn.functional.layer_norm(x32, (40,), norm.weight.float(), norm.bias.float(), norm.eps)
    assert y.dtype == torch.float32 and y_low.dtype == torch.bfloat16
    (dx,) = torch.autograd.grad(y, x, dy)
    (dx_want,) = torch.autograd.grad(want, x32, dy)
    assert dx.dtype == x_dtype
    bf16_ulp = 2.0 ** -7 * 1.01  # one bf16 rounding: the interpreter truncates bf16 stores
    assert_close(y, want, 1e-5, 1e-5, "y")
    assert_close(y_low.float(), want.bfloat16().float(), 0.0, bf16_ulp, "y_low")
    assert_close(dx.float(), dx_want.to(x_dtype).float(), 1e-5, 1e-5 if x_dtype == torch.float32 else bf16_ulp, "dx")
