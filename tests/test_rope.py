"""The rotary-embedding primitives (in place) of every backend against `torch_impl` and timm's
`apply_rot_embed_cat`, and the `rope_` op (in-place on views of a packed q/k/v GEMM output, gradients
through a FrozenLinear, the out-of-place fallback) against autograd through timm's formula."""
import pytest
import torch
from timm.layers import apply_rot_embed_cat

from utils import assert_close, assert_flash_rule
from vpt_fast.backends import resolve, torch_impl
from vpt_fast.ops.linear import linear
from vpt_fast.ops.rope import rope_

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
B, H, d = 2, 3, 8
EMB_SHAPES = {"plain": lambda R: (R, 2 * d), "per_head": lambda R: (H, R, 2 * d),
              "batch": lambda R: (B, 1, R, 2 * d), "batch_head": lambda R: (B, H, R, 2 * d)}
# `impl` (the triton backend module) comes from conftest.py


def _timm(t, emb, start, half):
    """What the op replaces: timm's out-of-place rotation of the rows after the prefix."""
    rows = t.shape[2] - start
    return torch.cat([t[:, :, :start], apply_rot_embed_cat(t[:, :, start:], emb[..., :rows, :], half=half)], dim=2)


def _packed(N, dtype=torch.float32, device=DEVICE, seed=0, requires_grad=False):
    """(x, W, q, k, v): q, k, v views (B, H, N, d) of one packed GEMM output, as timm's Attention."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, 16, generator=g).to(device, dtype).requires_grad_(requires_grad)
    W = torch.randn(3 * H * d, 16, generator=g).to(device, dtype) / 4
    qkv = linear(x, W).view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    return x, W, qkv[0], qkv[1], qkv[2]


def _emb(kind, R, device=DEVICE, seed=1):
    return torch.randn(EMB_SHAPES[kind](R), generator=torch.Generator().manual_seed(seed)).to(device)


def test_torch_impl_is_timm_float64():
    """The specification against timm's function and its autograd, in float64, both layouts."""
    for half in (False, True):
        x = torch.randn(B, H, 6, d, dtype=torch.float64)
        emb = torch.randn(H, 9, 2 * d, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        want = apply_rot_embed_cat(xr, emb[:, :6], half=half)
        assert_close(torch_impl.rope_fwd(x.clone(), emb, half), want, 1e-13, 1e-13, "y")
        dy = torch.randn_like(x)
        assert_close(torch_impl.rope_bwd(dy.clone(), emb, half), torch.autograd.grad(want, xr, dy)[0],
                     1e-13, 1e-13, "dx")


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("kind", list(EMB_SHAPES))
@pytest.mark.parametrize("start", [0, 1, 5])
def test_primitives_in_place_on_packed_views(impl, backend, half, kind, start):
    """Each backend's primitives rotate the rows of a non-contiguous packed view in place (the rows
    before start, v and the other views untouched) equal to timm; the backward equals timm's autograd."""
    N = 9
    module = impl if backend == "triton" else resolve(backend, "rope", torch.device(DEVICE))
    _, _, q, k, v = _packed(N)
    emb = _emb(kind, N - start + 3)  # more rows than needed: the first N - start are used
    want = _timm(q, emb, start, half)
    k0, v0 = k.clone(), v.clone()
    out = module.rope_fwd(q.narrow(2, start, N - start), emb, half)
    assert out.data_ptr() == q[:, :, start:].data_ptr()
    assert_close(q, want, 1e-6, 1e-6, "q")
    assert torch.equal(k, k0) and torch.equal(v, v0)
    qr = q.detach().clone().requires_grad_()
    y = _timm(qr, emb, start, half)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, qr, dy)
    got = dy.clone()
    module.rope_bwd(got[:, :, start:], emb, half)
    assert_close(got, dx, 1e-6, 1e-6, "dx")


def test_triton_matches_torch_impl_strided_dy(impl):
    """A non-contiguous dy (a view of a wider buffer) and odd sizes, against the specification."""
    for half in (False, True):
        dy = torch.randn(B, 5, H, 2 * 6 + 3, device=DEVICE)[..., 3:].permute(0, 2, 1, 3)  # d = 12
        emb = torch.randn(1, H, 7, 24, device=DEVICE)
        a, b = dy.clone(), dy.clone()
        impl.rope_bwd(a, emb, half), torch_impl.rope_bwd(b, emb, half)
        assert_close(a, b, 1e-6, 1e-6, "dx")
        impl.rope_fwd(a, emb, half), torch_impl.rope_fwd(b, emb, half)
        assert_close(a, b, 1e-6, 1e-6, "y")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(impl, backend, dtype):
    """bf16/fp16 rows with a float32 emb by the 2x rule against float64, timm's own eager result in
    the same dtype as the baseline (it, too, computes in fp32 and rounds once)."""
    module = impl if backend == "triton" else torch_impl
    for half in (False, True):
        _, _, q, _, _ = _packed(9, dtype=dtype)
        emb = _emb("per_head", 8)
        ref = _timm(q.double(), emb.double(), 1, half)
        base = _timm(q, emb, 1, half)
        module.rope_fwd(q[:, :, 1:], emb, half)
        # the interpreter truncates fp32 -> bf16 stores (GPUs round): one bf16 ulp of slack there
        atol = 3e-2 if dtype == torch.bfloat16 and not HAS_CUDA and backend == "triton" else 1e-3
        assert q.dtype == dtype
        assert_flash_rule(q, ref, base, "y", atol=atol)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("kind", ["plain", "per_head", "batch"])
def test_op_gradients_through_frozen_linear(impl, backend, half, kind):
    """q and k rotated in place inside one packed FrozenLinear output (which saved nothing): outputs
    and the gradient w.r.t. the GEMM input equal autograd through timm's out-of-place formula; the
    op returns t itself and saves only emb."""
    N, start = 9, 2
    emb = _emb(kind, N - start)
    x, W, q, k, v = _packed(N, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    qkv = torch.nn.functional.linear(xr, W).view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    want = (_timm(qkv[0], emb, start, half), _timm(qkv[1], emb, start, half), qkv[2])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q2, k2 = rope_(q, emb, start, half, backend), rope_(k, emb, start, half, backend)
    assert q2 is q and k2 is k
    assert all(s.data_ptr() == emb.data_ptr() for s in saved) and len(saved) == 2
    for name, got, ref in zip("qkv", (q, k, v), want):
        assert_close(got, ref, 1e-6, 1e-6, name)
    dys = [torch.randn(B, H, N, d) for _ in range(3)]
    (dx,) = torch.autograd.grad((q, k, v), x, dys)
    (dx_want,) = torch.autograd.grad(want, xr, dys)
    assert_close(dx, dx_want, 1e-5, 1e-5, "dx")


def test_op_non_view_input_keeps_incoming_gradient():
    """t that is not a view (a q-norm output): the incoming gradient may be held elsewhere, so the
    backward works on a copy; rows before start pass their gradient through."""
    a = torch.randn(B, H, 6, d, requires_grad=True)
    emb = _emb("plain", 6)
    t = a * 1.0
    y = rope_(t, emb, 1, False, "torch")
    dy = torch.randn(B, H, 6, d)
    dy0 = dy.clone()
    (da,) = torch.autograd.grad(y, a, dy)
    ar = a.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(_timm(ar * 1.0, emb, 1, False), ar, dy)
    assert torch.equal(dy, dy0)
    assert_close(da, want, 1e-6, 1e-6, "da")


def test_op_fallbacks_out_of_place():
    """emb that requires grad, a leaf that requires grad, and a split output (a view autograd forbids
    writing through) take timm's out-of-place formula; gradients (emb's too) equal timm's."""
    emb = _emb("plain", 6).requires_grad_()
    t = torch.randn(B, H, 6, d, requires_grad=True)
    y = rope_(t * 1.0, emb, 1, True, "torch")
    ref = _timm(t, emb, 1, True)
    assert_close(y, ref, 0, 0, "y")
    g = torch.autograd.grad(y.square().sum(), (t, emb))
    g_want = torch.autograd.grad(ref.square().sum(), (t, emb))
    for a, b in zip(g, g_want):
        assert_close(a, b, 1e-6, 1e-6, "grad")
    emb = emb.detach()
    y = rope_(t, emb, 1, True, "torch")  # a leaf
    assert y is not t and t.grad_fn is None
    base = torch.randn(B, H, 6, 2 * d, requires_grad=True) * 1.0
    q, k = base.split(d, dim=-1)
    y = rope_(q, emb, 1, False, "torch")
    assert y is not q
    assert_close(y, _timm(q, emb, 1, False), 0, 0, "split view")
    assert_close(k, base[..., d:], 0, 0, "k untouched")


def test_op_no_grad_and_edge_cases():
    """No autograd: written in place; N <= start returns t unchanged; returns t itself."""
    _, _, q, _, _ = _packed(4)
    emb = _emb("plain", 4)
    want = _timm(q, emb, 1, False)
    with torch.no_grad():
        assert rope_(q, emb, 1, False, "torch") is q
    assert_close(q, want, 0, 0, "q")
    q0 = q.clone()
    assert rope_(q, emb, 4, False, "torch") is q and rope_(q, emb, 7, False, "torch") is q
    assert torch.equal(q, q0)


def test_op_bf16_autocast_keeps_dtype():
    """bf16 rows (an autocast GEMM's output) and a float32 emb: stored in bf16, equal to timm's
    fp32 computation cast once."""
    _, _, q, _, _ = _packed(7, dtype=torch.bfloat16, device="cpu")
    emb = _emb("per_head", 7, device="cpu")
    want = _timm(q, emb, 2, True)
    assert rope_(q, emb, 2, True, "torch").dtype == torch.bfloat16
    assert torch.equal(q, want)


def test_rope_torch_compile(impl):
    N = 6
    emb = _emb("per_head", N)

    def f(x, dy):
        q = x.view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)[0]
        impl.rope_fwd(q[:, :, 1:], emb, True)
        impl.rope_bwd(dy[:, :, 1:], emb, True)
        return x, dy

    x = torch.randn(B, N, 3 * H * d, device=DEVICE)
    dy = torch.randn(B, H, N, d, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor" if HAS_CUDA else "aot_eager", fullgraph=True)
    got = compiled(x.clone(), dy.clone())
    want = f(x.clone(), dy.clone())
    for name, a, b in zip(("x", "dy"), got, want):
        assert_close(a, b, 1e-6, 1e-6, name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs(impl, backend):
    module = impl if backend == "triton" else torch_impl
    x = torch.randn(B, H, 5, d, device=DEVICE)
    with pytest.raises(ValueError, match="last dim must be 2 \\* head dim"):
        module.rope_fwd(x, torch.randn(5, d, device=DEVICE), False)
    with pytest.raises(ValueError, match="fewer than the 5 rows"):
        module.rope_fwd(x, torch.randn(4, 2 * d, device=DEVICE), False)
    with pytest.raises(ValueError, match="do not broadcast"):
        module.rope_fwd(x, torch.randn(H + 1, 5, 2 * d, device=DEVICE), False)
    with pytest.raises(ValueError, match="must be even"):
        module.rope_fwd(x[..., :7], torch.randn(5, 14, device=DEVICE), False)
    with pytest.raises(ValueError, match="fewer than the 4 rows"):
        rope_(x, torch.randn(3, 2 * d, device=DEVICE), 1, False, backend)
    if backend == "triton":
        with pytest.raises(TypeError, match="x dtype"):
            module.rope_fwd(x.double(), torch.randn(5, 2 * d, device=DEVICE), False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_gpu(impl, dtype):
    """ViT-S DINOv3 shape: 8 x 6 heads x 201 rows (5 prefix), d = 64, both layouts."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for half in (False, True):
        qkv = torch.randn(8, 201, 3, 6, 64, device="cuda", generator=g).to(dtype).permute(2, 0, 3, 1, 4)
        emb = torch.randn(196, 128, device="cuda", generator=g)
        a, b = qkv[0].clone(), qkv[0]
        torch_impl.rope_fwd(a[:, :, 5:], emb, half)
        impl.rope_fwd(b[:, :, 5:], emb, half)
        assert_close(b.float(), a.float(), 1e-5, 1e-5 if dtype == torch.float32 else 1e-2, "y")
