"""Prompt-aware attention primitives of the triton (and cuda) backends against `torch_impl` in float64.

On the CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest.py), with
small shapes; `@pytest.mark.gpu` tests use ViT-B shapes and check bf16/fp16 with FlashAttention's
rule (error <= 2x the error of eager PyTorch in the same precision, docs/design.md §5).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from utils import assert_close, assert_flash_rule, eager_attention_low_precision, rel_error
from vpt_fast.backends import backend_module, cuda_impl, torch_impl
from vpt_fast.backends.torch_impl import attention as torch_attention

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _backend(name):
    module = backend_module(name)
    if module is None:
        pytest.skip(f"backend {name!r} is not available on this machine")
    return module


def _call(fn, *args):
    try:
        return fn(*args)
    except NotImplementedError as e:
        pytest.skip(f"not implemented by this backend: {e}")


def _inputs(B, H, Nq, Nk, P, Bp, d, nb, dtype, views=True, device=DEVICE, seed=0):
    """q, k, v (views into one qkv buffer when Nq == Nk and `views`), pk, pv, bias, dout."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if views and Nq == Nk:
        qkv = rnd(B, Nq, 3, H, d).permute(2, 0, 3, 1, 4)  # as timm's Attention: (3, B, H, N, d) view
        q, k, v = qkv[0], qkv[1], qkv[2]
    else:
        q, k, v = rnd(B, H, Nq, d), rnd(B, H, Nk, d), rnd(B, H, Nk, d)
    pk = pv = None
    if P:
        pk, pv = rnd(Bp, P, H, d).transpose(1, 2), rnd(Bp, H, P, d)  # pk non-contiguous too
    bias = rnd(nb, H, Nq, Nk) if nb else None
    dout = rnd(B, H, Nq, d)
    return q, k, v, pk, pv, bias, dout


def _f64(*ts):
    return [None if t is None else t.detach().double() for t in ts]


def _run(impl, q, k, v, pk, pv, bias, dout, scale):
    out, lse = _call(impl.attention_fwd, q, k, v, pk, pv, scale, bias)
    grads = _call(impl.attention_bwd, dout, q, k, v, pk, pv, out, lse, scale, bias)
    return out, lse, grads


def _reference(q, k, v, pk, pv, bias, dout, scale):
    q, k, v, pk, pv, bias, dout = _f64(q, k, v, pk, pv, bias, dout)
    return _run(torch_impl, q, k, v, pk, pv, bias, dout, scale)


GRAD_NAMES = ("dq", "dk", "dv", "dpk", "dpv")


def _check_exact(impl, args, scale, tol):
    out, lse, grads = _run(impl, *args, scale)
    r_out, r_lse, r_grads = _reference(*args, scale)
    q = args[0]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert_close(out, r_out, tol, tol, "out")
    assert_close(lse, r_lse, tol, tol, "lse")
    for name, g, r in zip(GRAD_NAMES, grads, r_grads):
        if r is None:
            assert g is None, f"{name} must be None without prompts"
            continue
        assert g.shape == r.shape and g.dtype == q.dtype, f"{name}: {g.shape} {g.dtype}"
        assert_close(g, r, tol, tol, name)


BACKENDS = ["triton", "cuda"]


# B = 4 so that Bp in {1, 2, B} covers batch-shared, per-window-group and per-sample segments.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("P,Bp", [(0, 1), (1, 1), (7, 1), (7, 2), (7, 4), (1, 4), (20, 2)])
@pytest.mark.parametrize("nb", [0, 2], ids=["nobias", "bias"])
def test_attention_fp32(backend, P, Bp, nb):
    impl = _backend(backend)
    args = _inputs(4, 2, 13, 13, P, Bp, 16, nb, torch.float32)
    _check_exact(impl, args, 16 ** -0.5, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nq,Nk,P,d,nb", [(13, 20, 7, 32, 1), (33, 17, 0, 16, 2), (5, 1, 3, 64, 0),
                                          (17, 13, 5, 80, 1), (9, 9, 200, 128, 0)])
def test_attention_shapes_fp32(backend, Nq, Nk, P, d, nb):
    """Nq != Nk, multi-block queries/keys, single key, padded head dim 80, P = 200."""
    impl = _backend(backend)
    args = _inputs(2, 2, Nq, Nk, P, 1, d, nb, torch.float32, views=False, seed=1)
    _check_exact(impl, args, 0.3, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_contiguous_and_views_agree(backend):
    impl = _backend(backend)
    q, k, v, pk, pv, bias, dout = _inputs(2, 3, 13, 13, 7, 1, 16, 1, torch.float32)
    a = _run(impl, q, k, v, pk, pv, bias, dout, 0.25)
    c = [None if t is None else t.contiguous() for t in (q, k, v, pk, pv, bias, dout)]
    b = _run(impl, *c, 0.25)
    assert_close(a[0], b[0], 1e-6, 1e-6, "out")
    for name, x, y in zip(GRAD_NAMES, a[2], b[2]):
        assert_close(x, y, 1e-6, 1e-6, name)


def _check_flash_rule(impl, args, scale, atol=1e-4):
    out, lse, grads = _run(impl, *args, scale)
    r_out, r_lse, r_grads = _reference(*args, scale)
    e_out, e_grads = eager_attention_low_precision(*args, scale)
    # Baseline: the worse of eager low-precision math and torch_impl run in the same precision.
    t_out, _, t_grads = _run(torch_impl, *args, scale)
    for name, x, r, e, t in zip(("out",) + GRAD_NAMES, [out, *grads], [r_out, *r_grads],
                                [e_out, *e_grads], [t_out, *t_grads]):
        if r is None:
            continue
        base = e if (e.double() - r).abs().max() >= (t.double() - r).abs().max() else t
        assert_flash_rule(x, r, base, name, atol=atol * max(1.0, r.abs().max().item()))
    assert_close(lse, r_lse, 1e-2, 1e-3, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_low_precision_small(backend, dtype):
    impl = _backend(backend)
    args = _inputs(4, 2, 13, 13, 7, 2, 32, 2, dtype)
    _check_flash_rule(impl, args, 32 ** -0.5, atol=2e-3)


def test_attention_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    impl = _backend("triton")
    q, k, v, pk, pv, bias, dout = _inputs(2, 2, 13, 13, 7, 1, 16, 0, torch.float32)
    with FlopCounterMode(display=False) as counter:
        out, lse = impl.attention_fwd(q, k, v, pk, pv, 0.25)
        impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25)
    fwd = 4 * 2 * 2 * 13 * (7 + 13) * 16
    assert counter.get_total_flops() == fwd + fwd * 5 // 2


def test_attention_torch_compile_traces_without_graph_breaks():
    impl = _backend("triton")
    q, k, v, pk, pv, bias, dout = _inputs(2, 2, 13, 13, 7, 2, 16, 1, torch.float32)

    def f(q, k, v, pk, pv, bias, dout):
        out, lse = impl.attention_fwd(q, k, v, pk, pv, 0.25, bias)
        return (out,) + tuple(impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25, bias))

    torch._dynamo.reset()
    # "aot_eager" traces the custom ops (fake tensors) without inductor's codegen, so it also runs
    # under the CPU interpreter; fullgraph=True turns any graph break into an error.
    compiled = torch.compile(f, backend="inductor" if HAS_CUDA else "aot_eager", fullgraph=True)
    got, want = compiled(q, k, v, pk, pv, bias, dout), f(q, k, v, pk, pv, bias, dout)
    for name, x, y in zip(("out",) + GRAD_NAMES, got, want):
        assert_close(x, y, 1e-5, 1e-5, name)


def test_attention_bad_inputs_raise_clear_errors():
    impl = _backend("triton")
    q, k, v, pk, pv, bias, dout = _inputs(4, 2, 13, 13, 7, 2, 16, 2, torch.float32, views=False)
    with pytest.raises(ValueError, match="head dim"):
        impl.attention_fwd(q[..., :8], k[..., :8], v[..., :8], None, None, 1.0)
    with pytest.raises(ValueError, match="head dim"):
        x = torch.zeros(1, 1, 4, 256, device=DEVICE)
        impl.attention_fwd(x, x, x, None, None, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        impl.attention_fwd(q.double(), k.double(), v.double(), None, None, 1.0)
    with pytest.raises(TypeError, match="k dtype"):
        impl.attention_fwd(q, k.half(), v, None, None, 1.0)
    with pytest.raises(ValueError, match="must divide"):
        impl.attention_fwd(q, k, v, pk[:1].expand(3, -1, -1, -1), pv[:1].expand(3, -1, -1, -1), 1.0)
    with pytest.raises(ValueError, match="k must be"):
        impl.attention_fwd(q, k[:, :1], v[:, :1], None, None, 1.0)
    with pytest.raises(ValueError, match="together"):
        impl.attention_fwd(q, k, v, pk, None, 1.0)
    with pytest.raises(ValueError, match="bias must be"):
        impl.attention_fwd(q, k, v, pk, pv, 1.0, bias[:, :, :5])
    with pytest.raises(ValueError, match="bias must be"):
        impl.attention_fwd(q, k, v, pk, pv, 1.0, bias[:1].expand(3, -1, -1, -1))
    with pytest.raises(ValueError, match="pk must be"):
        impl.attention_fwd(q, k, v, pk[:, :1], pv[:, :1], 1.0)
    out, lse = impl.attention_fwd(q, k, v, pk, pv, 1.0)
    with pytest.raises(ValueError, match="lse must be"):
        impl.attention_bwd(dout, q, k, v, pk, pv, out, lse.double(), 1.0)


# ------------------------------------------------------------------------------------------------
# GPU: ViT-B shapes, head dims 32..128, bf16/fp16 with FlashAttention's rule.
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("P,Bp,nb", [(50, 1, 0), (50, 8, 0), (0, 1, 0), (1, 1, 0), (7, 2, 4), (50, 1, 1)])
def test_attention_gpu_vit_b(backend, dtype, P, Bp, nb):
    impl = _backend(backend)
    args = _inputs(8, 12, 197, 197, P, Bp, 64, nb, dtype, device="cuda")
    _check_flash_rule(impl, args, 64 ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [32, 64, 80, 128])
def test_attention_gpu_head_dims(backend, dtype, d):
    impl = _backend(backend)
    # Swin-like: 49-token windows, 4 windows per image share a per-image prompt segment, with bias.
    args = _inputs(8, 3, 49, 49, 10, 2, d, 4, dtype, device="cuda", seed=d)
    _check_flash_rule(impl, args, d ** -0.5)
    args = _inputs(2, 4, 197, 150, 200, 1, d, 0, dtype, device="cuda", views=False, seed=d)
    _check_flash_rule(impl, args, d ** -0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Nq,Nk,P,Bp", [(1, 1, 1, 1), (3, 0, 5, 1), (65, 63, 1, 3), (130, 7, 64, 3),
                                         (17, 129, 0, 1)])
def test_attention_gpu_odd_lengths(backend, dtype, Nq, Nk, P, Bp):
    """Tile edges: single rows, prompt-only keys, lengths just off multiples of 64."""
    impl = _backend(backend)
    args = _inputs(3, 2, Nq, Nk, P, Bp, 64, 0, dtype, device="cuda", views=False, seed=Nq)
    _check_flash_rule(impl, args, 0.125)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [32, 64, 80, 128])
@pytest.mark.parametrize("N,P,Bp,nb", [(197, 50, 1, 2), (67, 50, 1, 2), (67, 7, 4, 0), (67, 0, 1, 1)])
def test_attention_gpu_fp32(backend, d, N, P, Bp, nb):
    impl = _backend(backend)
    args = _inputs(4, 3, N, N, P, Bp, d, nb, torch.float32, device="cuda", seed=d)
    _check_exact(impl, args, d ** -0.5, 1e-4)


class _OpRecorder(TorchDispatchMode):
    """Records the aten ops that run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _naive_attention(q, k, v, pk, pv, bias, dout, scale):
    """A literal softmax over [expanded prompts; own keys] in float64 with autograd: (out, lse, grads)."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    lq, lk, lv, lpk, lpv = leaves
    B, P = q.shape[0], 0 if pk is None else pk.shape[2]
    keys, values = lk, lv
    if pk is not None:
        owner = torch.arange(B) // (B // pk.shape[0])  # query batch b reads prompt batch b // (B // Bp)
        keys, values = torch.cat([lpk[owner], lk], 2), torch.cat([lpv[owner], lv], 2)
    scores = lq @ keys.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + torch.nn.functional.pad(bias.double()[torch.arange(B) % bias.shape[0]], (P, 0))
    out = torch.softmax(scores, -1) @ values
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout.double())
    return out.detach(), torch.logsumexp(scores, -1).detach(), list(grads) + [None] * (5 - len(grads))


# (B, H, Nq, Nk, P, Bp, d, nB): batch-shared, per-window-group and per-sample prompt segments; Nq != Nk;
# an empty prompt segment; no own keys; no prompts.
TORCH_IMPL_SHAPES = [(4, 3, 11, 11, 5, 1, 16, 2), (4, 3, 11, 11, 5, 2, 16, 0), (4, 3, 11, 11, 5, 4, 16, 1),
                     (2, 2, 9, 13, 7, 1, 32, 1), (2, 2, 9, 9, 0, 1, 16, 2), (2, 2, 9, 0, 4, 2, 16, 0),
                     (3, 2, 9, 9, 0, 0, 16, 3)]


@pytest.mark.parametrize("path", ["segmented_fp32", "one_call_fp32", "math_fp32", "math_fp64"])
@pytest.mark.parametrize("views", [True, False], ids=["qkv_views", "contiguous"])
@pytest.mark.parametrize("shape", TORCH_IMPL_SHAPES, ids=[str(s) for s in TORCH_IMPL_SHAPES])
def test_torch_impl_matches_naive_attention(shape, views, path, monkeypatch):
    """The executable spec against a literal float64 softmax over [expanded prompts; own keys], within
    1e-5 relative in float32: the segmented path that CUDA runs (own keys and the prompt segment each
    through a fused kernel, here the CPU flash kernel, merged by log-sum-exp; backward from the merged
    out and lse), the CPU's one flash call over the concatenated keys, and the math path (float32 and
    float64)."""
    B, H, Nq, Nk, P, Bp, d, nb = shape
    dtype = torch.float64 if path == "math_fp64" else torch.float32
    monkeypatch.setattr(torch_attention, "_FORCE_MATH", path.startswith("math"))
    monkeypatch.setattr(torch_attention, "_CPU_ONE_CALL", path == "one_call_fp32")
    q, k, v, pk, pv, bias, dout = _inputs(B, H, Nq, Nk, P, max(Bp, 1), d, nb, dtype, views=views, device="cpu",
                                          seed=sum(shape))
    if Bp == 0:
        pk = pv = None
    scale = d ** -0.5
    want_out, want_lse, want_grads = _naive_attention(q, k, v, pk, pv, bias, dout, scale)
    with _OpRecorder() as recorder:
        out, lse = torch_impl.attention_fwd(q, k, v, pk, pv, scale, bias)
        grads = torch_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)
    calls = {"segmented_fp32": int(Nk > 0) + int(pk is not None and P > 0) or 1, "one_call_fp32": 1}.get(path, 0)
    fused_calls = (recorder.ops.count("_scaled_dot_product_flash_attention_for_cpu"),
                   recorder.ops.count("_scaled_dot_product_flash_attention_for_cpu_backward"))
    assert fused_calls == (calls, calls), recorder.ops
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert out.dtype == dtype and lse.dtype == dtype
    assert rel_error(out, want_out) < tol, ("out", rel_error(out, want_out))
    assert_close(lse, want_lse, atol=tol, rtol=tol, name="lse")
    for name, got, want in zip(GRAD_NAMES, grads, want_grads):
        if want is None:
            assert got is None, name
            continue
        assert got.shape == want.shape and got.dtype == dtype, name
        if want.numel():  # an empty segment has empty gradients
            assert rel_error(got, want) < tol, (name, rel_error(got, want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", TORCH_IMPL_SHAPES[:4], ids=[str(s) for s in TORCH_IMPL_SHAPES[:4]])
def test_torch_impl_segmented_low_precision(shape, dtype, monkeypatch):
    """The segmented path in bf16/fp16 (two fused kernel calls merged by log-sum-exp, CUDA's path, here
    through the CPU flash kernel) follows FlashAttention's rule against float64: at most 2x (plus one
    ulp at the tensor's scale) the error of one flash call over the concatenated keys in the same
    precision (what eager timm runs), output and every gradient."""
    monkeypatch.setattr(torch_attention, "_CPU_ONE_CALL", False)
    B, H, Nq, Nk, P, Bp, d, nb = shape
    args = _inputs(B, H, Nq, Nk, P, Bp, d, nb, dtype, device="cpu", seed=sum(shape))
    q, k, v, pk, pv, bias, dout = args
    scale = d ** -0.5
    want_out, _, want_grads = _naive_attention(*args, scale)
    out, lse = torch_impl.attention_fwd(q, k, v, pk, pv, scale, bias)
    grads = torch_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    kk, vv = torch_attention._joint_kv(leaves[1], leaves[2], leaves[3], leaves[4])
    mask = torch_attention._joint_bias(bias, B, P)
    one_call = torch.nn.functional.scaled_dot_product_attention(
        leaves[0], kk, vv, attn_mask=None if mask is None else mask.to(dtype), scale=scale)
    one_call_grads = torch.autograd.grad(one_call, leaves, dout)
    ulp = torch.finfo(dtype).eps
    for name, got, want, base in zip(("out",) + GRAD_NAMES, [out, *grads], [want_out, *want_grads],
                                     [one_call, *one_call_grads]):
        assert_flash_rule(got, want, base, name, atol=ulp * want.abs().max().item())


@pytest.mark.parametrize("kernel,dtype,nb", [("flash", torch.bfloat16, 0), ("efficient", torch.bfloat16, 4),
                                            ("efficient", torch.float32, 0), ("efficient", torch.float16, 1)])
@pytest.mark.parametrize("Bp", [1, 2], ids=["shared_prompts", "per_image_prompts"])
def test_torch_impl_cuda_kernel_calls_on_meta(kernel, dtype, nb, Bp):
    """The segmented path's CUDA calls (flash / efficient SDPA forward and backward, the efficient
    kernel's aligned bias and padded log-sum-exp) traced on meta tensors: argument lists the aten
    schemas accept, and shapes and dtypes of out, lse and every gradient."""
    B, H, N, P, d = 8, 3, 49, 5, 32
    meta = dict(device="meta", dtype=dtype)
    qkv = torch.empty(B, N, 3, H, d, **meta).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    pk, pv = torch.empty(Bp, H, P, d, **meta), torch.empty(Bp, H, P, d, **meta)
    bias = torch.empty(nb, H, N, N, device="meta") if nb else None
    with _OpRecorder() as recorder:
        out, lse = torch_attention._fused_attention_fwd(kernel, q, k, v, pk, pv, 0.2, bias)
        grads = torch_attention._fused_attention_bwd(kernel, torch.empty_like(out), q, k, v, pk, pv, out, lse, 0.2,
                                                     bias)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32
    for name, got, like in zip(GRAD_NAMES, grads, (q, k, v, pk, pv)):
        assert got.shape == like.shape and got.dtype == dtype, name
    prompt_kernel = "flash" if dtype != torch.float32 else "efficient"
    expected = {f"_scaled_dot_product_{kernel}_attention", f"_scaled_dot_product_{prompt_kernel}_attention"}
    assert {op for op in recorder.ops if op.startswith("_scaled_dot") and not op.endswith("backward")} == expected
    assert sum(op.startswith("_scaled_dot") and op.endswith("backward") for op in recorder.ops) == 2


def test_gpu_query_tile_fits_short_query_sets(impl, monkeypatch):
    """The GPU launch configs (not used by the interpreter) tile Swin's 49-query windows with 64
    rows, not 128, and keep ViT's 197 queries on the tuned 128-row tile."""
    from vpt_fast.backends.triton_impl import attention
    monkeypatch.setattr(attention, "INTERPRET", False)
    for kind in ("fwd", "dq", "dkdv"):
        tuned = attention._attn_config_h100(kind, 64, torch.bfloat16)["BLOCK_M"]
        assert attention._attn_config(kind, 64, torch.bfloat16, 49)["BLOCK_M"] == min(tuned, 64)
        assert attention._attn_config(kind, 64, torch.bfloat16, 197)["BLOCK_M"] == tuned
    assert attention._attn_config("fwd", 64, torch.bfloat16, 49)["BLOCK_M"] == 64


class _GridRecorder:
    """Stands in for the triton backend's `launch`: records (kernel, grid), runs nothing."""

    def __init__(self):
        self.grids = []

    def __call__(self, kernel, grid):
        self.grids.append((kernel.__name__, tuple(grid)))
        return lambda *args, **kwargs: None


# (B, H, Nq=Nk, d, Bp, P, nB, indexed): Swin-B stage 0 at batch 512 (512 images x 64 windows,
# prompts per image, rel-pos bias + shift mask per window), ViT-B/16 at batch 512 (deep prompts,
# Bp = 1) and the same with 64 tasks' prompt sets read by index (Bp = S = 64).
LARGE_SHAPES = {"swin_b_batch512_stage0": (512 * 64, 4, 49, 32, 512, 50, 64, False),
                "vit_b_batch512": (512, 12, 197, 64, 1, 50, 0, False),
                "vit_b_batch512_64_tasks": (512, 12, 197, 64, 64, 50, 0, True)}


@pytest.mark.parametrize("gpu_config", [True, False], ids=["gpu_config", "interpreter_config"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", list(LARGE_SHAPES), ids=list(LARGE_SHAPES))
def test_attention_launch_grids_within_cuda_limits(impl, monkeypatch, shape, dtype, gpu_config):
    """Every attention launch (forward, dQ, own and prompt dK/dV, their reduction) of a Swin-B or
    ViT-B batch of 512 keeps grid axis 0 below 2**31 and axes 1, 2 at most 65,535: batch x heads
    (131,072 for Swin-B) must not sit on axis 1 or 2. Meta tensors: the launcher runs, no kernel."""
    from vpt_fast.backends.triton_impl import attention
    B, H, N, d, Bp, P, nb, indexed = LARGE_SHAPES[shape]
    monkeypatch.setattr(attention, "INTERPRET", not gpu_config)
    recorder = _GridRecorder()
    monkeypatch.setattr(attention, "launch", recorder)
    meta = dict(device="meta", dtype=dtype)
    qkv = torch.empty(B, N, 3, H, d, **meta).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    pk, pv = torch.empty(Bp, H, P, d, **meta), torch.empty(Bp, H, P, d, **meta)
    bias = torch.empty(nb, H, N, N, **meta) if nb else None
    index = torch.empty(B, dtype=torch.int64, device="meta") if indexed else None
    out, lse = attention._attention_fwd_impl(q, k, v, pk, pv, d ** -0.5, bias, index)
    attention._attention_bwd_impl(torch.empty_like(out), q, k, v, pk, pv, out, lse, d ** -0.5, bias, index, None)
    launched = [name for name, _ in recorder.grids]
    assert launched[:3] == ["_attention_fwd", "_attention_bwd_dq", "_attention_bwd"], launched
    assert launched.count("_attention_bwd") == 2, launched  # own keys, then prompt keys
    for name, grid in recorder.grids:
        assert 1 <= len(grid) <= 3 and grid[0] < 2 ** 31 and all(g <= 65535 for g in grid[1:]), (name, grid)
    fwd_grid = recorder.grids[0][1]
    block_m = attention._attn_config("fwd", attention._block_d(d), dtype, N)["BLOCK_M"]
    assert fwd_grid == (-(-N // block_m) * B * H,)  # every (query block, batch, head) once


def test_launch_rejects_grids_past_cuda_limits(impl):
    from vpt_fast.backends.triton_impl import common
    from vpt_fast.kernels import attention as kernels
    assert common.check_grid((2 ** 31 - 1, 65535, 65535), "k") == (2 ** 31 - 1, 65535, 65535)
    for grid in [(2 ** 31, 1), (1, 65536), (1, 1, 65536)]:
        with pytest.raises(ValueError, match=r"_attention_fwd grid .* exceeds CUDA's limits"):
            common.launch(kernels._attention_fwd, grid)


# ------------------------------------------------------------------------------------------------
# Prompt sets read by index (several tasks in one batch) and the one qkv gradient buffer.
# ------------------------------------------------------------------------------------------------
def _naive_indexed_attention(q, k, v, pk, pv, bias, dout, scale, prompt_index):
    """A literal float64 softmax over [pk[prompt_index[b]]; own keys] with autograd: (out, lse, grads);
    pk/pv gradients summed per set by autograd (index_select's backward)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    lq, lk, lv, lpk, lpv = leaves
    P = pk.shape[2]
    keys = torch.cat([lpk.index_select(0, prompt_index), lk], 2)
    values = torch.cat([lpv.index_select(0, prompt_index), lv], 2)
    scores = lq @ keys.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + torch.nn.functional.pad(bias.double()[torch.arange(q.shape[0]) % bias.shape[0]], (P, 0))
    out = torch.softmax(scores, -1) @ values
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out.detach(), torch.logsumexp(scores, -1).detach(), list(grads)


# (B, S, index, nB): S not dividing B with an unused set; every sample on one set (others unused);
# one sample per set in shuffled order; more sets than samples.
INDEX_CASES = {"S3_B5_unused_set": (5, 3, [2, 0, 2, 2, 0], 0), "all_one_set": (4, 3, [1, 1, 1, 1], 2),
               "permuted_per_sample": (3, 3, [2, 0, 1], 1), "S5_B2": (2, 5, [4, 1], 0)}


def _indexed_inputs(case, dtype=torch.float32, seed=0):
    B, S, index, nb = INDEX_CASES[case]
    q, k, v, _, _, bias, dout = _inputs(B, 2, 11, 11, 0, 1, 16, nb, dtype, seed=seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    pk = torch.randn(S, 7, 2, 16, generator=g).to(DEVICE, dtype).transpose(1, 2)  # non-contiguous
    pv = torch.randn(S, 2, 7, 16, generator=g).to(DEVICE, dtype)
    return q, k, v, pk, pv, bias, dout, torch.tensor(index, device=DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_indexed_attention_matches_float64_reference(backend, case):
    """attention_fwd/bwd(prompt_index=) of the backend against a float64 softmax over the gathered
    sets: output, lse and every gradient; sets no sample reads get exact zeros."""
    impl = backend_module(backend) if backend == "torch" else _backend(backend)
    q, k, v, pk, pv, bias, dout, index = _indexed_inputs(case)
    out, lse = impl.attention_fwd(q, k, v, pk, pv, 0.3, bias, prompt_index=index)
    grads = impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.3, bias, prompt_index=index)
    want_out, want_lse, want_grads = _naive_indexed_attention(q, k, v, pk, pv, bias, dout, 0.3, index)
    assert_close(out, want_out, 2e-5, 2e-5, "out")
    assert_close(lse, want_lse, 2e-5, 2e-5, "lse")
    for name, got, want, like in zip(GRAD_NAMES, grads, want_grads, (q, k, v, pk, pv)):
        assert got.shape == like.shape and got.dtype == like.dtype, name
        assert_close(got, want, 2e-5, 2e-5, name)
    unused = sorted(set(range(pk.shape[0])) - set(index.tolist()))
    for name, got in zip(("dpk", "dpv"), grads[3:]):
        assert torch.equal(got[unused], torch.zeros_like(got[unused])), f"{name} of unused sets {unused}"


@pytest.mark.parametrize("sms", [1, 64], ids=["one_program_per_set", "split_over_samples"])
@pytest.mark.parametrize("case", ["S3_B5_unused_set", "all_one_set"])
def test_triton_indexed_prompt_grads_reproducible(impl, monkeypatch, case, sms):
    """The per-set prompt-gradient reduction is bitwise the same on two runs and equal to the
    reference, whether a set's samples run in one program or split over programs (fp32 partials
    summed in split order)."""
    from vpt_fast.backends.triton_impl import attention
    monkeypatch.setattr(attention, "_num_sms", lambda device: sms)
    q, k, v, pk, pv, bias, dout, index = _indexed_inputs(case, seed=3)
    out, lse = impl.attention_fwd(q, k, v, pk, pv, 0.3, bias, prompt_index=index)
    first = impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.3, bias, prompt_index=index)
    second = impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.3, bias, prompt_index=index)
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name
    _, _, want = _naive_indexed_attention(q, k, v, pk, pv, bias, dout, 0.3, index)
    assert_close(first[3], want[3], 2e-5, 2e-5, "dpk")
    assert_close(first[4], want[4], 2e-5, 2e-5, "dpv")


def test_torch_indexed_prompt_grads_reproducible():
    """The torch backend's per-set sum (one-hot GEMM) is bitwise the same on two runs."""
    q, k, v, pk, pv, bias, dout, index = _indexed_inputs("S3_B5_unused_set", seed=4)
    out, lse = torch_impl.attention_fwd(q, k, v, pk, pv, 0.3, bias, prompt_index=index)
    first = torch_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.3, bias, prompt_index=index)
    second = torch_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.3, bias, prompt_index=index)
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_indexed_equals_grouped_without_index(backend):
    """An index that spells out the grouped layout (b // (B // Bp)) gives the grouped result."""
    impl = backend_module(backend) if backend == "torch" else _backend(backend)
    q, k, v, pk, pv, bias, dout = _inputs(4, 2, 13, 13, 7, 2, 16, 2, torch.float32)
    index = torch.tensor([0, 0, 1, 1], device=DEVICE)
    grouped = _run(impl, q, k, v, pk, pv, bias, dout, 0.25)
    out, lse = impl.attention_fwd(q, k, v, pk, pv, 0.25, bias, prompt_index=index)
    indexed = impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25, bias, prompt_index=index)
    assert_close(out, grouped[0], 1e-6, 1e-6, "out")
    for name, a, b in zip(GRAD_NAMES, indexed, grouped[2]):
        assert_close(a, b, 1e-6, 1e-6, name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("indexed", [False, True], ids=["grouped", "indexed"])
def test_attention_bwd_writes_into_one_qkv_buffer(backend, indexed):
    """attention_bwd(dqkv=) fills the (B, N, 3, H, d) buffer's q, k, v slots with the gradients of
    the separate path and returns views of it."""
    impl = backend_module(backend) if backend == "torch" else _backend(backend)
    if indexed:
        q, k, v, pk, pv, bias, dout, index = _indexed_inputs("S3_B5_unused_set")
    else:
        q, k, v, pk, pv, bias, dout = _inputs(4, 2, 13, 13, 7, 2, 16, 2, torch.float32)
        index = None
    out, lse = impl.attention_fwd(q, k, v, pk, pv, 0.25, bias, prompt_index=index)
    separate = impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25, bias, prompt_index=index)
    dqkv = torch.full((q.shape[0], q.shape[2], 3, q.shape[1], q.shape[3]), float("nan"), device=DEVICE)
    packed = impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25, bias, prompt_index=index, dqkv=dqkv)
    for name, a, b in zip(GRAD_NAMES, packed, separate):
        assert torch.equal(a, b), name
    for i, grad in enumerate(packed[:3]):
        assert grad.data_ptr() == dqkv[:, :, i].data_ptr() and grad.stride() == dqkv[:, :, i].transpose(1, 2).stride()
    assert torch.equal(dqkv, torch.stack([g.transpose(1, 2) for g in separate[:3]], 2))


OP_BACKENDS = ["torch", "triton", "cuda"]


def _op_backend(backend):
    """`backend`, after skipping the test when it cannot run here."""
    if backend != "torch":
        _backend(backend)
    return backend


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("case", ["S3_B5_unused_set", "S5_B2"])
def test_attention_op_with_index_matches_reference(backend, case):
    """The op (autograd) with prompt_index: output and the gradients of q, k, v, pk, pv against the
    float64 reference, for every backend."""
    from vpt_fast.ops.attention import attention
    backend = _op_backend(backend)
    q, k, v, pk, pv, bias, dout, index = _indexed_inputs(case, seed=5)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out = attention(*leaves, scale=0.3, bias=bias, backend=backend, prompt_index=index)
    grads = torch.autograd.grad(out, leaves, dout)
    want_out, _, want_grads = _naive_indexed_attention(q, k, v, pk, pv, bias, dout, 0.3, index)
    assert_close(out, want_out, 2e-5, 2e-5, "out")
    for name, got, want in zip(GRAD_NAMES, grads, want_grads):
        assert_close(got, want, 2e-5, 2e-5, name)


class _RecordDqkv:
    """Wraps a backend's attention_bwd and records the dqkv buffer it was handed."""

    def __init__(self, bwd):
        self.bwd, self.buffers = bwd, []

    def __call__(self, *args, **kwargs):
        self.buffers.append(kwargs.get("dqkv"))
        return self.bwd(*args, **kwargs)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("indexed", [False, True], ids=["shared_prompts", "indexed"])
def test_attention_qkv_gradient_is_the_backend_buffer(backend, indexed, monkeypatch):
    """attention_qkv equals attention on the q, k, v views (output and every gradient),
    and the gradient autograd delivers to qkv is the very buffer the backend filled: no stacking
    or copying of separate dq, dk, dv."""
    from vpt_fast.backends import resolve
    from vpt_fast.ops.attention import attention, attention_qkv
    backend = _op_backend(backend)
    B, N, H, d = 5, 11, 2, 16
    g = torch.Generator(device="cpu").manual_seed(7)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(DEVICE)
    if indexed:
        pk, pv, index = torch.randn(3, H, 7, d, generator=g), torch.randn(3, H, 7, d, generator=g), \
            torch.tensor([2, 0, 2, 2, 0])
    else:
        pk, pv, index = torch.randn(1, H, 7, d, generator=g), torch.randn(1, H, 7, d, generator=g), None
    pk, pv = pk.to(DEVICE), pv.to(DEVICE)
    index = None if index is None else index.to(DEVICE)
    dout = torch.randn(B, H, N, d, generator=g).to(DEVICE)

    leaves = [t.clone().requires_grad_() for t in (qkv, pk, pv)]
    q, k, v = leaves[0].permute(2, 0, 3, 1, 4)
    want = attention(q, k, v, leaves[1], leaves[2], scale=0.3, backend=backend, prompt_index=index)
    want_grads = torch.autograd.grad(want, leaves, dout)

    impl = resolve(backend, "attention", qkv.device)
    recorder = _RecordDqkv(impl.attention_bwd)
    monkeypatch.setattr(impl, "attention_bwd", recorder)
    leaves = [t.clone().requires_grad_() for t in (qkv, pk, pv)]
    delivered = []
    leaves[0].register_hook(delivered.append)
    out = attention_qkv(leaves[0], leaves[1], leaves[2], scale=0.3, backend=backend, prompt_index=index)
    grads = torch.autograd.grad(out, leaves, dout)
    assert_close(out, want, 1e-6, 1e-6, "out")
    for name, got, ref in zip(("dqkv", "dpk", "dpv"), grads, want_grads):
        assert_close(got, ref, 1e-6, 1e-6, name)
    (buffer,) = recorder.buffers
    assert buffer is not None and delivered[0] is buffer and grads[0].data_ptr() == buffer.data_ptr()


def test_vit_block_backward_does_not_stack_qkv_gradients():
    """ViTBlock with the torch backend: the attention's q, k, v gradient reaches the qkv projection
    as one buffer (no `stack` / `cat` in backward), and equals timm's block."""
    from utils import tiny_vit
    from vpt_fast.blocks.vit import ViTBlock
    timm_block = tiny_vit().blocks[0]
    block = ViTBlock.from_timm(timm_block, backend="torch")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, block.attn.qkv.in_features, generator=g, requires_grad=True)
    out = block(x)
    with _OpRecorder() as recorder:
        (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert "stack" not in recorder.ops and "cat" not in recorder.ops, recorder.ops
    x2 = x.detach().clone().requires_grad_()
    want = block.forward_reference(x2)
    (want_dx,) = torch.autograd.grad(want, x2, torch.ones_like(want))
    assert_close(out, want, 1e-5, 1e-5, "out")
    assert_close(dx, want_dx, 1e-5, 1e-5, "dx")


def test_prompt_index_bad_inputs_raise_clear_errors():
    from vpt_fast.ops.attention import attention, attention_qkv
    q, k, v, pk, pv, _, _, index = _indexed_inputs("S3_B5_unused_set")
    qkv = torch.randn(5, 11, 3, 2, 16, device=DEVICE)
    for call in (lambda i: attention(q, k, v, pk, pv, prompt_index=i),
                 lambda i: attention_qkv(qkv, pk, pv, prompt_index=i)):
        with pytest.raises(ValueError, match="int64"):
            call(index.float())
        with pytest.raises(ValueError, match=r"shape \(B=5,\)"):
            call(index[:4])
        with pytest.raises(ValueError, match=r"shape \(B=5,\)"):
            call(index[:, None])
        with pytest.raises(ValueError, match=r"\[0, S=3\).*from 0 to 3"):
            call(torch.tensor([0, 1, 2, 3, 0], device=DEVICE))
        with pytest.raises(ValueError, match=r"\[0, S=3\).*from -1 to 2"):
            call(torch.tensor([0, 1, 2, -1, 0], device=DEVICE))
        with pytest.raises(ValueError, match="device"):
            call(index.to("meta"))
    with pytest.raises(ValueError, match="needs prompt sets"):
        attention(q, k, v, prompt_index=index)
    with pytest.raises(ValueError, match=r"\(S, H=2, P, d=16\)"):
        attention(q, k, v, pk[:, :1], pv[:, :1], prompt_index=index)
    # int32 is accepted by the op (cast once); the backends take int64 only
    out32 = attention(q, k, v, pk, pv, prompt_index=index.int())
    assert torch.equal(out32, attention(q, k, v, pk, pv, prompt_index=index))


def test_triton_prompt_index_and_dqkv_argument_checks(impl):
    q, k, v, pk, pv, _, dout, index = _indexed_inputs("S3_B5_unused_set")
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        impl.attention_fwd(q, k, v, pk, pv, 0.3, prompt_index=index.int())
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        impl.attention_fwd(q, k, v, pk, pv, 0.3, prompt_index=index[:2])
    with pytest.raises(ValueError, match="needs a prompt segment"):
        impl.attention_fwd(q, k, v, None, None, 0.3, prompt_index=index)
    out, lse = impl.attention_fwd(q, k, v, pk, pv, 0.3, prompt_index=index)
    with pytest.raises(ValueError, match="dqkv must be"):
        impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.3, prompt_index=index,
                           dqkv=torch.empty(5, 11, 2, 2, 16, device=DEVICE))
    with pytest.raises(ValueError, match="dqkv must be"):
        impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.3, prompt_index=index,
                           dqkv=torch.empty(5, 11, 3, 2, 16, device=DEVICE, dtype=torch.float16))


@pytest.mark.slow
def test_attention_op_with_index_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces attention with an index (torch backend, CPU) and its
    backward; the range check becomes an asynchronous assert that still fires."""
    from vpt_fast.ops.attention import attention
    q, k, v, pk, pv, bias, dout, index = _indexed_inputs("S3_B5_unused_set")
    q, k, v, pk, pv, bias, dout, index = (t.cpu() if t is not None else None
                                          for t in (q, k, v, pk, pv, bias, dout, index))

    def f(q, k, v, pk, pv, index):
        return attention(q, k, v, pk, pv, scale=0.3, backend="torch", prompt_index=index)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, f):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
        out = fn(*leaves, index)
        out.backward(dout)
        results.append([out] + [t.grad for t in leaves])
    for name, a, b in zip(("out",) + GRAD_NAMES, *results):
        assert_close(a, b, 1e-6, 1e-6, name)
    with pytest.raises(RuntimeError, match=r"\[0, S=3\)"):
        compiled(q, k, v, pk, pv, torch.tensor([0, 1, 2, 3, 0]))

# ------------------------------------------------------------------------------------------------
# The C++/CUDA extension (`vpt_fast._C`, backend module `cuda_impl`). CPU: its twin equals torch_impl
# in float64 (forward and every gradient; odd lengths, P in {0, 1, 7, 50}, Bp in {1, 2, B}, bias
# on/off, non-contiguous views), with a prompt-set index (S not dividing B, unused sets, bitwise
# per-set sums) and one qkv gradient buffer; every argument check raises a clear error;
# torch.compile(fullgraph=True) traces the ops through their fake implementations and FlopCounterMode
# counts them. GPU (`@pytest.mark.gpu`): FlashAttention's rule for the CUDA kernels in bf16/fp16
# against float64, fp32 exactness, bitwise determinism (the triton backend's prompt gradients too).
# ------------------------------------------------------------------------------------------------
needs_ext = pytest.mark.skipif(not cuda_impl.AVAILABLE, reason="vpt_fast._C is not built")


def _ext_cuda_ready():
    if not (cuda_impl.AVAILABLE and cuda_impl.WITH_CUDA):
        pytest.skip("vpt_fast._C built without CUDA kernels")


def _ext_inputs(B, H, Nq, Nk, P, Bp, d, nb, dtype=torch.float64, device="cpu", views=True, seed=0):
    """q, k, v (views into one qkv buffer when Nq == Nk and `views`), pk (non-contiguous), pv, bias,
    dout."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    if views and Nq == Nk:
        q, k, v = rnd(B, Nq, 3, H, d).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = rnd(B, H, Nq, d), rnd(B, H, Nk, d), rnd(B, H, Nk, d)
    pk = pv = None
    if P:
        pk, pv = rnd(Bp, P, H, d).transpose(1, 2), rnd(Bp, H, P, d)
    bias = rnd(nb, H, Nq, Nk) if nb else None
    return q, k, v, pk, pv, bias, rnd(B, H, Nq, d)


def _ext_run(impl, q, k, v, pk, pv, bias, dout, scale):
    out, lse = impl.attention_fwd(q, k, v, pk, pv, scale, bias)
    return out, lse, impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)


def _ext_reference(q, k, v, pk, pv, bias, dout, scale):
    """torch_impl's math path in float64 on the CPU."""
    f64 = [None if t is None else t.detach().double().cpu() for t in (q, k, v, pk, pv, bias, dout)]
    old, torch_attention._FORCE_MATH = torch_attention._FORCE_MATH, True
    try:
        return _ext_run(torch_impl, *f64, scale)
    finally:
        torch_attention._FORCE_MATH = old


def _ext_check_exact(args, scale, tol):
    out, lse, grads = _ext_run(cuda_impl, *args, scale)
    r_out, r_lse, r_grads = _ext_reference(*args, scale)
    q = args[0]
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == q.shape[:3]
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert_close(out.cpu(), r_out, tol, tol, "out")
    assert_close(lse.cpu(), r_lse, tol, tol, "lse")
    for name, g, r in zip(GRAD_NAMES, grads, r_grads):
        if r is None:
            assert g is None, f"{name} must be None without prompts"
            continue
        assert g.shape == r.shape and g.dtype == q.dtype, f"{name}: {g.shape} {g.dtype}"
        assert_close(g.cpu(), r, tol, tol, name)


@needs_ext
@pytest.mark.parametrize("P,Bp", [(0, 1), (1, 1), (7, 1), (7, 2), (7, 4), (1, 4), (50, 2)])
@pytest.mark.parametrize("nb", [0, 1, 2], ids=["nobias", "bias1", "bias2"])
def test_cpu_twin_float64(P, Bp, nb):
    args = _ext_inputs(4, 2, 13, 13, P, Bp, 16, nb)
    _ext_check_exact(args, 16 ** -0.5, 1e-10)


@needs_ext
@pytest.mark.parametrize("Nq,Nk,P,d,nb", [(13, 20, 7, 32, 1), (33, 17, 0, 16, 2), (5, 1, 3, 64, 0),
                                          (17, 13, 5, 80, 1), (9, 9, 200, 128, 0), (3, 0, 5, 8, 0),
                                          (1, 1, 1, 3, 0)])
def test_cpu_twin_shapes(Nq, Nk, P, d, nb):
    """Nq != Nk, a single key, only prompt keys (Nk = 0), odd head dims, P = 200."""
    args = _ext_inputs(2, 2, Nq, Nk, P, 1, d, nb, views=False, seed=1)
    _ext_check_exact(args, 0.3, 1e-10)


@needs_ext
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2),
                                       (torch.float16, 5e-3)])
def test_cpu_twin_low_precision(dtype, tol):
    """float32 accumulation: only the final rounding to the input dtype differs from float64."""
    args = _ext_inputs(4, 2, 13, 13, 7, 2, 16, 2, dtype=dtype)
    _ext_check_exact(args, 0.25, tol)


@needs_ext
def test_cpu_twin_empty_prompt_segment_equals_none():
    q, k, v, pk, pv, bias, dout = _ext_inputs(2, 2, 5, 5, 3, 1, 8, 1)
    a = _ext_run(cuda_impl, q, k, v, None, None, bias, dout, 0.5)
    b = _ext_run(cuda_impl, q, k, v, pk[:, :, :0], pv[:, :, :0], bias, dout, 0.5)
    assert_close(a[0], b[0], 0, 0, "out")
    for name, x, y in zip(GRAD_NAMES[:3], a[2][:3], b[2][:3]):
        assert_close(x, y, 0, 0, name)
    assert b[2][3].shape == pk[:, :, :0].shape


@needs_ext
def test_cpu_twin_views_equal_contiguous_and_output_layout():
    q, k, v, pk, pv, bias, dout = _ext_inputs(2, 3, 13, 13, 7, 1, 16, 1, dtype=torch.float32)
    assert not q.is_contiguous() and not pk.is_contiguous()
    a = _ext_run(cuda_impl, q, k, v, pk, pv, bias, dout, 0.25)
    c = [None if t is None else t.contiguous() for t in (q, k, v, pk, pv, bias, dout)]
    b = _ext_run(cuda_impl, *c, 0.25)
    assert_close(a[0], b[0], 0, 0, "out")
    for name, x, y in zip(GRAD_NAMES, a[2], b[2]):
        assert_close(x, y, 0, 0, name)
    out = a[0]  # (B, H, N, d) view of a (B, N, H, d) buffer: the head merge is free
    assert out.transpose(1, 2).is_contiguous()


@needs_ext
def test_cpu_twin_backward_is_deterministic():
    """The shared prompt segment's gradients are summed over the batch in a fixed order."""
    q, k, v, pk, pv, bias, dout = _ext_inputs(16, 2, 13, 13, 7, 1, 16, 2, dtype=torch.float32)
    out, lse = cuda_impl.attention_fwd(q, k, v, pk, pv, 0.25, bias)
    first = cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25, bias)
    again = cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25, bias)
    for name, x, y in zip(GRAD_NAMES, first, again):
        assert torch.equal(x, y), name


@needs_ext
def test_cpu_twin_matches_attention_autograd():
    """Through the public op (autograd.Function) with backend="cuda" on the CPU."""
    from vpt_fast.ops.attention import attention
    q, k, v, pk, pv, bias, dout = _ext_inputs(4, 2, 9, 9, 5, 2, 8, 2)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out = attention(*leaves, scale=0.4, bias=bias, backend="cuda")
    grads = torch.autograd.grad(out, leaves, dout)
    r_out, _, r_grads = _ext_reference(q, k, v, pk, pv, bias, dout, 0.4)
    assert_close(out, r_out, 1e-10, 1e-10, "out")
    for name, g, r in zip(GRAD_NAMES, grads, r_grads):
        assert_close(g, r, 1e-10, 1e-10, name)


@needs_ext
def test_bad_inputs_raise_clear_errors():
    f, b = cuda_impl.attention_fwd, cuda_impl.attention_bwd
    q, k, v, pk, pv, bias, dout = _ext_inputs(4, 2, 13, 13, 7, 2, 16, 2, dtype=torch.float32, views=False)
    with pytest.raises(TypeError, match=r"q dtype must be .*got Int"):
        f(q.int(), k.int(), v.int(), None, None, 1.0)
    with pytest.raises(TypeError, match=r"k dtype must match q \(Float\), got Half"):
        f(q, k.half(), v, None, None, 1.0)
    with pytest.raises(TypeError, match=r"pv dtype must match q"):
        f(q, k, v, pk, pv.double(), 1.0)
    with pytest.raises(ValueError, match=r"q must be \(B, H, Nq, d\) with 4 dims, got shape \[4, 2, 13\]"):
        f(q[..., 0], k, v, None, None, 1.0)
    with pytest.raises(ValueError, match=r"k must be \(B=4, H=2, Nk, d=16\), got shape \[4, 1, 13, 16\]"):
        f(q, k[:, :1], v[:, :1], None, None, 1.0)
    with pytest.raises(ValueError, match=r"v must have k's shape"):
        f(q, k, v[:, :, :5], None, None, 1.0)
    with pytest.raises(ValueError, match="together"):
        f(q, k, v, pk, None, 1.0)
    with pytest.raises(ValueError, match=r"prompt batch Bp=3 must divide the query batch B=4"):
        f(q, k, v, pk[:1].expand(3, -1, -1, -1), pv[:1].expand(3, -1, -1, -1), 1.0)
    with pytest.raises(ValueError, match=r"pk must be \(Bp, H=2, P, d=16\)"):
        f(q, k, v, pk[:, :1], pv[:, :1], 1.0)
    with pytest.raises(ValueError, match=r"pv must have pk's shape"):
        f(q, k, v, pk, pv[:, :, :3], 1.0)
    with pytest.raises(ValueError, match=r"bias must be \(nB, H=2, Nq=13, Nk=13\)"):
        f(q, k, v, pk, pv, 1.0, bias[:, :, :5])
    with pytest.raises(ValueError, match=r"nB dividing B=4"):
        f(q, k, v, pk, pv, 1.0, bias[:1].expand(3, -1, -1, -1))
    with pytest.raises(ValueError, match=r"q must have a unit stride on its last \(head\) dim"):
        f(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), None, None, 1.0)
    with pytest.raises(ValueError, match=r"pk must have a unit stride"):
        f(q, k, v, pk.transpose(2, 3).contiguous().transpose(2, 3), pv, 1.0)
    with pytest.raises(ValueError, match=r"at least one key"):
        f(q, k[:, :, :0], v[:, :, :0], None, None, 1.0)
    out, lse = f(q, k, v, pk, pv, 1.0)
    with pytest.raises(ValueError, match=r"lse must be Float .*got Double"):
        b(dout, q, k, v, pk, pv, out, lse.double(), 1.0)
    with pytest.raises(ValueError, match=r"lse must be \(B, H, Nq\)"):
        b(dout, q, k, v, pk, pv, out, lse[:, :, :3], 1.0)
    with pytest.raises(ValueError, match=r"dout must have q's shape"):
        b(dout[:, :, :3], q, k, v, pk, pv, out, lse, 1.0)
    with pytest.raises(TypeError, match=r"out dtype must match q"):
        b(dout, q, k, v, pk, pv, out.double(), lse, 1.0)


@pytest.mark.gpu
@needs_ext
def test_cuda_bad_inputs_raise_clear_errors():
    if not cuda_impl.WITH_CUDA:
        pytest.skip("extension built without CUDA")
    q, k, v, pk, pv, bias, dout = _ext_inputs(2, 2, 13, 13, 7, 1, 48, 0, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match=r"head dim on CUDA: expected d in \{32, 64, 80, 128\}, got d=48"):
        cuda_impl.attention_fwd(q, k, v, pk, pv, 1.0)
    x = torch.zeros(1, 1, 4, 64, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match=r"float32, float16 or bfloat16 \(CUDA\), got Double"):
        cuda_impl.attention_fwd(x, x, x, None, None, 1.0)
    y = torch.zeros(1, 1, 4, 64, device="cuda")
    with pytest.raises(ValueError, match=r"k must be on q's device cuda"):
        cuda_impl.attention_fwd(y, y.cpu(), y.cpu(), None, None, 1.0)


@needs_ext
def test_torch_compile_fullgraph_through_fake_impls():
    q, k, v, pk, pv, bias, dout = _ext_inputs(2, 2, 13, 13, 7, 2, 16, 1, dtype=torch.float32)

    def f(q, k, v, pk, pv, bias, dout):
        out, lse = cuda_impl.attention_fwd(q, k, v, pk, pv, 0.25, bias)
        return (out,) + tuple(cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25, bias))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, want = compiled(q, k, v, pk, pv, bias, dout), f(q, k, v, pk, pv, bias, dout)
    for name, x, y in zip(("out",) + GRAD_NAMES, got, want):
        assert x.shape == y.shape and x.stride() == y.stride(), name
        assert_close(x, y, 1e-6, 1e-6, name)


@needs_ext
def test_fake_impls_match_real_shapes_strides_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    for P in (0, 5):
        args = _ext_inputs(4, 2, 9, 11, P, 2, 8, 2, dtype=torch.float32, views=False)
        q, k, v, pk, pv, bias, dout = args
        real = _ext_run(cuda_impl, *args, 0.5)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fargs = [None if t is None else mode.from_tensor(t) for t in args]
            fake = _ext_run(cuda_impl, *fargs, 0.5)
        flat_r = [real[0], real[1], *real[2]]
        flat_f = [fake[0], fake[1], *fake[2]]
        for x, y in zip(flat_r, flat_f):
            if x is None:
                assert y is None
                continue
            assert x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype


@needs_ext
def test_flop_counter_counts_the_ops():
    from torch.utils.flop_counter import FlopCounterMode
    q, k, v, pk, pv, bias, dout = _ext_inputs(2, 2, 13, 13, 7, 1, 16, 0, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        out, lse = cuda_impl.attention_fwd(q, k, v, pk, pv, 0.25)
        cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25)
    fwd = 4 * 2 * 2 * 13 * (7 + 13) * 16
    assert counter.get_total_flops() == fwd + fwd * 5 // 2


@pytest.mark.gpu
def test_cuda_unaligned_views_and_layout():
    """Offsets that break 16-byte alignment take the scalar load path; results match contiguous."""
    _ext_cuda_ready()
    q, k, v, pk, pv, bias, dout = _ext_inputs(2, 3, 37, 37, 5, 1, 64, 1, dtype=torch.bfloat16, device="cuda")
    base = torch.randn(2 * 3 * 37 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    q_odd = base[1:].view(2, 3, 37, 64)  # 2-byte offset: not 16-byte aligned
    q_odd.copy_(q)
    a = _ext_run(cuda_impl, q_odd, k, v, pk, pv, bias, dout, 0.125)
    b = _ext_run(cuda_impl, q.contiguous(), k, v, pk, pv, bias, dout, 0.125)
    assert_close(a[0], b[0], 0, 0, "out")
    for name, x, y in zip(GRAD_NAMES, a[2], b[2]):  # same arithmetic in the same order: bitwise equal
        assert_close(x, y, 0, 0, name)
    assert a[0].transpose(1, 2).is_contiguous()


@pytest.mark.gpu
def test_cuda_matches_cpu_twin_and_is_deterministic_forward():
    _ext_cuda_ready()
    args = _ext_inputs(4, 2, 50, 50, 9, 2, 64, 2, dtype=torch.float32, device="cuda")
    out1, lse1 = cuda_impl.attention_fwd(*args[:5], 0.125, args[5])
    out2, lse2 = cuda_impl.attention_fwd(*args[:5], 0.125, args[5])
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    cpu = [None if t is None else t.cpu() for t in args]
    out_c, lse_c = cuda_impl.attention_fwd(*cpu[:5], 0.125, cpu[5])
    assert_close(out1.cpu(), out_c, 1e-5, 1e-5, "out")
    assert_close(lse1.cpu(), lse_c, 1e-5, 1e-5, "lse")


# (B, H, N, P, Bp, d, nb): ViT-B/16 deep (one prompt segment shared by the batch); Swin-B stage 0
# (16 images x 64 windows of 49 tokens, shared deep prompts, a bias per window); Swin per-image
# prompt segments (16 images x 16 windows, Bp=16).
DETERMINISM_SHAPES = {"vit-b": (64, 12, 197, 50, 1, 64, 0), "swin-stage0": (1024, 4, 49, 50, 1, 32, 64),
                      "swin-per-image": (256, 16, 49, 10, 16, 32, 16)}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", list(DETERMINISM_SHAPES.values()), ids=list(DETERMINISM_SHAPES))
def test_backward_is_deterministic(backend, shape):
    """Three backward calls on the same inputs give bitwise-equal gradients, the prompt gradients
    (reduced over the query batches sharing a prompt batch) included: no atomics, a fixed order."""
    import importlib
    impl = importlib.import_module(f"vpt_fast.backends.{backend}_impl")
    if not impl.AVAILABLE or (backend == "cuda" and not impl.WITH_CUDA):
        pytest.skip(f"{backend} backend not available")
    B, H, N, P, Bp, d, nb = shape
    q, k, v, pk, pv, bias, dout = _ext_inputs(B, H, N, N, P, Bp, d, nb, dtype=torch.bfloat16, device="cuda")
    scale = d ** -0.5
    out, lse = impl.attention_fwd(q, k, v, pk, pv, scale, bias)
    first = impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)
    assert first[3].shape == pk.shape and torch.isfinite(first[3]).all() and first[3].abs().sum() > 0
    for _ in range(2):
        again = impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)
        for name, x, y in zip(GRAD_NAMES, first, again):
            if not torch.equal(x, y):
                raise AssertionError(f"{backend} {name}: {int((x != y).sum())} of {x.numel()} elements "
                                     f"differ between two backward calls on the same inputs")


@pytest.mark.gpu
def test_cuda_torch_compile_inductor():
    _ext_cuda_ready()
    args = _ext_inputs(2, 2, 33, 33, 7, 1, 64, 1, dtype=torch.bfloat16, device="cuda")

    def f(q, k, v, pk, pv, bias, dout):
        out, lse = cuda_impl.attention_fwd(q, k, v, pk, pv, 0.125, bias)
        return (out,) + tuple(cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.125, bias))

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*args)
    want = f(*args)
    for name, x, y in zip(("out",) + GRAD_NAMES, got, want):
        assert_close(x.float(), y.float(), 1e-2, 1e-2, name)


# (B, S, index): S not dividing B with an unused set, one set for all batches, a permutation, and
# sets in decreasing order (the per-set order is not the batch order)
EXT_INDEXES = {"uneven": (5, 3, [2, 0, 2, 2, 0]), "one-set": (4, 3, [1, 1, 1, 1]),
           "permutation": (4, 4, [3, 0, 2, 1]), "decreasing": (6, 4, [3, 3, 2, 1, 1, 0])}


def _ext_index_inputs(B, S, H, N, P, d, nb, dtype=torch.float64, device="cpu", seed=0):
    """q, k, v as views of one (B, N, 3, H, d) qkv buffer, pk (S, H, P, d) non-contiguous, pv, bias,
    dout."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    q, k, v = rnd(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    pk, pv = rnd(S, P, H, d).transpose(1, 2), rnd(S, H, P, d)
    bias = rnd(nb, H, N, N) if nb else None
    return q, k, v, pk, pv, bias, rnd(B, H, N, d)


def _ext_index_run(q, k, v, pk, pv, bias, dout, scale, prompt_index=None, dqkv=None):
    out, lse = cuda_impl.attention_fwd(q, k, v, pk, pv, scale, bias, prompt_index=prompt_index)
    grads = cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias,
                                    prompt_index=prompt_index, dqkv=dqkv)
    return out, lse, grads


def _per_set_sum(per_batch, index, S):
    """(S, ...) sums of the per-batch rows of each set, added in increasing batch order."""
    total = per_batch.new_zeros((S,) + per_batch.shape[1:])
    for b, s in enumerate(index.tolist()):
        total[s] += per_batch[b]
    return total


def _ext_index_reference(q, k, v, pk, pv, bias, dout, scale, index):
    """torch_impl's math path in float64 on the CPU with gathered per-batch prompts (Bp = B)."""
    f64 = [None if t is None else t.detach().double().cpu() for t in (q, k, v, pk, pv, bias, dout)]
    q, k, v, pk, pv, bias, dout = f64
    index = index.cpu()
    old, torch_attention._FORCE_MATH = torch_attention._FORCE_MATH, True
    try:
        out, lse = torch_impl.attention_fwd(q, k, v, pk[index], pv[index], scale, bias)
        dq, dk, dv, dpk, dpv = torch_impl.attention_bwd(dout, q, k, v, pk[index], pv[index], out, lse,
                                                        scale, bias)
    finally:
        torch_attention._FORCE_MATH = old
    S = pk.shape[0]
    return out, lse, (dq, dk, dv, _per_set_sum(dpk, index, S), _per_set_sum(dpv, index, S))


def _ext_check_against_reference(args, index, scale, tol):
    out, lse, grads = _ext_index_run(*args, scale, prompt_index=index)
    r_out, r_lse, r_grads = _ext_index_reference(*args, scale, index)
    q, pk = args[0], args[3]
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert_close(out.cpu(), r_out, tol, tol, "out")
    assert_close(lse.cpu(), r_lse, tol, tol, "lse")
    for name, g, r in zip(GRAD_NAMES, grads, r_grads):
        assert g.shape == r.shape and g.dtype == q.dtype, f"{name}: {tuple(g.shape)} {g.dtype}"
        assert_close(g.cpu(), r, tol, tol, name)
    assert grads[3].shape == pk.shape


@needs_ext
@pytest.mark.parametrize("case", list(EXT_INDEXES))
@pytest.mark.parametrize("P,nb", [(7, 0), (1, 1)], ids=["P7", "P1-bias"])
def test_cpu_indexed_equals_gathered_reference_float64(case, P, nb):
    B, S, index = EXT_INDEXES[case]
    args = _ext_index_inputs(B, S, 2, 9, P, 8, nb)
    _ext_check_against_reference(args, torch.tensor(index), 8 ** -0.5, 1e-10)


@needs_ext
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_cpu_indexed_low_precision(dtype, tol):
    B, S, index = EXT_INDEXES["decreasing"]
    args = _ext_index_inputs(B, S, 2, 11, 5, 16, 2, dtype=dtype)
    _ext_check_against_reference(args, torch.tensor(index), 0.25, tol)


@needs_ext
def test_cpu_indexed_equals_the_twin_on_gathered_prompts_bitwise():
    """The index only moves a pointer: out, lse, dq, dk, dv equal the gathered run bit for bit, and
    each set's prompt gradient is the per-batch gradients added in batch order (float32)."""
    B, S, index = EXT_INDEXES["uneven"]
    q, k, v, pk, pv, bias, dout = _ext_index_inputs(B, S, 3, 13, 7, 16, 1, dtype=torch.float32)
    index = torch.tensor(index)
    out, lse, grads = _ext_index_run(q, k, v, pk, pv, bias, dout, 0.25, prompt_index=index)
    g_out, g_lse, g_grads = _ext_index_run(q, k, v, pk[index], pv[index], bias, dout, 0.25)
    assert torch.equal(out, g_out) and torch.equal(lse, g_lse)
    for name, x, y in zip(GRAD_NAMES[:3], grads[:3], g_grads[:3]):
        assert torch.equal(x, y), name
    assert torch.equal(grads[3], _per_set_sum(g_grads[3], index, S))
    assert torch.equal(grads[4], _per_set_sum(g_grads[4], index, S))


@needs_ext
def test_cpu_unused_sets_get_exact_zeros_and_grads_are_reproducible():
    B, S, index = 6, 5, torch.tensor([4, 1, 4, 1, 1, 4])
    args = _ext_index_inputs(B, S, 2, 9, 7, 8, 0, dtype=torch.float32)
    first = _ext_index_run(*args, 0.3, prompt_index=index)[2]
    for name in ("dpk", "dpv"):
        g = first[GRAD_NAMES.index(name)]
        assert torch.equal(g[[0, 2, 3]], torch.zeros_like(g[[0, 2, 3]])), name
        assert g[[1, 4]].abs().amin() > 0, name
    again = _ext_index_run(*args, 0.3, prompt_index=index)[2]
    for name, x, y in zip(GRAD_NAMES, first, again):
        assert torch.equal(x, y), name


@needs_ext
def test_cpu_index_with_an_empty_prompt_segment():
    """P == 0: no prompt keys; zero-size prompt gradients of pk's shape."""
    q, k, v, pk, pv, bias, dout = _ext_index_inputs(3, 2, 2, 5, 1, 8, 0)
    index = torch.tensor([1, 0, 1])
    a = _ext_index_run(q, k, v, pk[:, :, :0], pv[:, :, :0], bias, dout, 0.5, prompt_index=index)
    b = _ext_index_run(q, k, v, None, None, bias, dout, 0.5)
    assert torch.equal(a[0], b[0])
    assert a[2][3].shape == (2, 2, 0, 8) and a[2][4].shape == (2, 2, 0, 8)


@needs_ext
@pytest.mark.parametrize("indexed", [False, True], ids=["grouped", "indexed"])
def test_cpu_dqkv_equals_separate_buffers(indexed):
    """dq, dk, dv land in the views of one (B, N, 3, H, d) buffer, bit for bit as returned
    separately; the returned gradients are those views."""
    B, S, H, N, d = 4, 2, 3, 11, 16
    q, k, v, pk, pv, bias, dout = _ext_index_inputs(B, S, H, N, 7, d, 2, dtype=torch.float32)
    index = torch.tensor([1, 0, 0, 1]) if indexed else None
    sep = _ext_index_run(q, k, v, pk, pv, bias, dout, 0.25, prompt_index=index)[2]
    dqkv = torch.full((B, N, 3, H, d), float("nan"))
    got = _ext_index_run(q, k, v, pk, pv, bias, dout, 0.25, prompt_index=index, dqkv=dqkv)[2]
    for i, name in enumerate(GRAD_NAMES[:3]):
        assert torch.equal(got[i], sep[i]), name
        assert got[i].data_ptr() == dqkv[:, :, i].data_ptr() and got[i].stride() == (N * 3 * H * d, d, 3 * H * d, 1)
        assert torch.equal(dqkv[:, :, i].transpose(1, 2), sep[i]), name
    assert torch.equal(got[3], sep[3]) and torch.equal(got[4], sep[4])


@needs_ext
def test_cpu_dqkv_without_prompts_and_without_bias():
    q, k, v, _, _, _, dout = _ext_index_inputs(2, 1, 2, 7, 1, 8, 0, dtype=torch.float32)
    sep = _ext_index_run(q, k, v, None, None, None, dout, 0.5)[2]
    dqkv = torch.empty(2, 7, 3, 2, 8)
    got = _ext_index_run(q, k, v, None, None, None, dout, 0.5, dqkv=dqkv)[2]
    assert got[3] is None and got[4] is None
    for i, name in enumerate(GRAD_NAMES[:3]):
        assert torch.equal(got[i], sep[i]), name


@needs_ext
def test_bad_index_and_dqkv_arguments_raise():
    f, b = cuda_impl.attention_fwd, cuda_impl.attention_bwd
    q, k, v, pk, pv, bias, dout = _ext_index_inputs(4, 3, 2, 9, 5, 8, 0, dtype=torch.float32)
    index = torch.tensor([2, 0, 1, 2])
    with pytest.raises(TypeError, match=r"prompt_index dtype must be int64 \(Long\), got Int"):
        f(q, k, v, pk, pv, 1.0, prompt_index=index.int())
    with pytest.raises(ValueError, match=r"prompt_index must be \(B,\) = \(4,\), .*got shape \[5\]"):
        f(q, k, v, pk, pv, 1.0, prompt_index=torch.tensor([0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"prompt_index must be \(B,\) = \(4,\), .*got shape \[4, 1\]"):
        f(q, k, v, pk, pv, 1.0, prompt_index=index[:, None])
    with pytest.raises(ValueError, match=r"prompt_index must be contiguous, got strides \[2\]"):
        f(q, k, v, pk, pv, 1.0, prompt_index=torch.tensor([2, 9, 0, 9, 1, 9, 2, 9])[::2])
    with pytest.raises(ValueError, match=r"prompt_index values must be in \[0, S=3\), got 3 at position 1"):
        f(q, k, v, pk, pv, 1.0, prompt_index=torch.tensor([0, 3, 1, 1]))
    with pytest.raises(ValueError, match=r"prompt_index values must be in \[0, S=3\), got -1 at position 0"):
        f(q, k, v, pk, pv, 1.0, prompt_index=torch.tensor([-1, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"prompt_index needs the prompt sets pk, pv"):
        f(q, k, v, None, None, 1.0, prompt_index=index)
    with pytest.raises(ValueError, match=r"prompt batch Bp=3 must divide the query batch B=4 .*prompt_index"):
        f(q, k, v, pk, pv, 1.0)
    out, lse = f(q, k, v, pk, pv, 1.0, prompt_index=index)
    with pytest.raises(ValueError, match=r"prompt_index values must be in \[0, S=3\)"):
        b(dout, q, k, v, pk, pv, out, lse, 1.0, prompt_index=torch.tensor([0, 1, 2, 7]))
    with pytest.raises(TypeError, match=r"dqkv dtype must match q \(Float\), got Double"):
        b(dout, q, k, v, pk, pv, out, lse, 1.0, prompt_index=index, dqkv=torch.empty(4, 9, 3, 2, 8).double())
    with pytest.raises(ValueError, match=r"dqkv must be \(B=4, N=9, 3, H=2, d=8\), got shape \[4, 9, 2, 2, 8\]"):
        b(dout, q, k, v, pk, pv, out, lse, 1.0, prompt_index=index, dqkv=torch.empty(4, 9, 2, 2, 8))
    with pytest.raises(ValueError, match=r"dqkv must have 5 dims"):
        b(dout, q, k, v, pk, pv, out, lse, 1.0, prompt_index=index, dqkv=torch.empty(4, 9, 3, 16))
    with pytest.raises(ValueError, match=r"dqkv must have a unit stride"):
        b(dout, q, k, v, pk, pv, out, lse, 1.0, prompt_index=index,
          dqkv=torch.empty(8, 4, 9, 3, 2).permute(1, 2, 3, 4, 0))
    q2 = q[:, :, :5]
    out2, lse2 = f(q2, k, v, pk, pv, 1.0, prompt_index=index)
    with pytest.raises(ValueError, match=r"dqkv needs as many queries as keys \(Nq == Nk\), got Nq=5, Nk=9"):
        b(dout[:, :, :5], q2, k, v, pk, pv, out2, lse2, 1.0, prompt_index=index, dqkv=torch.empty(4, 5, 3, 2, 8))


@needs_ext
def test_torch_compile_fullgraph_with_index_and_dqkv():
    B, S, index = EXT_INDEXES["uneven"]
    q, k, v, pk, pv, bias, dout = _ext_index_inputs(B, S, 2, 9, 7, 8, 1, dtype=torch.float32)
    index = torch.tensor(index)

    def f(q, k, v, pk, pv, bias, dout, index):
        out, lse = cuda_impl.attention_fwd(q, k, v, pk, pv, 0.25, bias, prompt_index=index)
        dqkv = q.new_empty(q.shape[0], q.shape[2], 3, q.shape[1], q.shape[3])
        grads = cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25, bias, prompt_index=index,
                                        dqkv=dqkv)
        return (out, dqkv * 2) + tuple(grads)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, want = compiled(q, k, v, pk, pv, bias, dout, index), f(q, k, v, pk, pv, bias, dout, index)
    for name, x, y in zip(("out", "2 dqkv") + GRAD_NAMES, got, want):
        assert x.shape == y.shape and x.stride() == y.stride(), name
        assert_close(x, y, 1e-6, 1e-6, name)


@needs_ext
@pytest.mark.parametrize("with_dqkv", [False, True], ids=["separate", "dqkv"])
def test_fake_impls_match_real_with_index(with_dqkv):
    from torch._subclasses.fake_tensor import FakeTensorMode
    B, S, index = EXT_INDEXES["uneven"]
    args = _ext_index_inputs(B, S, 2, 9, 7, 8, 1, dtype=torch.float32)
    index = torch.tensor(index)

    def run(args, index):
        q = args[0]
        dqkv = q.new_empty(B, 9, 3, 2, 8) if with_dqkv else None
        out, lse = cuda_impl.attention_fwd(*args[:5], 0.5, args[5], prompt_index=index)
        raw = torch.ops.vpt_fast.attention_bwd(args[6], *args[:5], out, lse, 0.5, args[5], index, dqkv)
        return [out, lse, *raw]

    real = run(args, index)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = run([None if t is None else mode.from_tensor(t) for t in args], mode.from_tensor(index))
    for x, y in zip(real, fake):
        assert x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype
    assert real[5].shape == (S, 2, 7, 8)


@needs_ext
def test_flop_counter_counts_the_indexed_ops():
    from torch.utils.flop_counter import FlopCounterMode
    B, S, index = EXT_INDEXES["uneven"]
    q, k, v, pk, pv, _, dout = _ext_index_inputs(B, S, 2, 9, 7, 8, 0, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        _ext_index_run(q, k, v, pk, pv, None, dout, 0.25, prompt_index=torch.tensor(index))
    fwd = 4 * B * 2 * 9 * (7 + 9) * 8
    assert counter.get_total_flops() == fwd + fwd * 5 // 2


# relative tolerances against the float64 reference, and for the prompt gradients against the
# gathered per-batch gradients summed per set in float64
EXT_CUDA_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(EXT_CUDA_TOL), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(16, 5, 12, 197, 50, 64, 0), (24, 7, 4, 49, 10, 32, 4),
                                   (6, 4, 2, 37, 3, 80, 0), (5, 3, 2, 70, 65, 128, 1)],
                         ids=["vit-b", "swin-windows-bias", "d80", "d128-two-key-tiles"])
def test_cuda_indexed_equals_gathered(dtype, shape):
    """Forward and dq, dk, dv equal the gathered run bit for bit (the index only moves a pointer);
    dpk, dpv equal the gathered per-batch gradients summed per set; everything near float64."""
    _ext_cuda_ready()
    B, S, H, N, P, d, nb = shape
    gen = torch.Generator().manual_seed(B)
    index = torch.randint(0, S - 1, (B,), generator=gen).cuda()  # set S - 1 unused
    args = _ext_index_inputs(B, S, H, N, P, d, nb, dtype=dtype, device="cuda", seed=1)
    q, k, v, pk, pv, bias, dout = args
    scale = d ** -0.5
    out, lse, grads = _ext_index_run(*args, scale, prompt_index=index)
    g_out, g_lse, g_grads = _ext_index_run(q, k, v, pk[index], pv[index], bias, dout, scale)
    assert torch.equal(out, g_out) and torch.equal(lse, g_lse)
    for name, x, y in zip(GRAD_NAMES[:3], grads[:3], g_grads[:3]):
        assert torch.equal(x, y), name
    tol = EXT_CUDA_TOL[dtype]
    for i in (3, 4):
        want = _per_set_sum(g_grads[i].double(), index, S)
        assert torch.equal(grads[i][S - 1], torch.zeros_like(grads[i][S - 1])), GRAD_NAMES[i]
        scale_ = want.abs().amax().item()
        assert_close(grads[i].double(), want, tol * scale_, tol, GRAD_NAMES[i])
    r_out, _, r_grads = _ext_index_reference(*args, scale, index)
    assert_close(out.double().cpu(), r_out, tol, tol, "out")
    for name, g, r in zip(GRAD_NAMES, grads, r_grads):
        assert_close(g.double().cpu(), r, tol * max(1.0, r.abs().amax().item()), tol, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_indexed_backward_is_deterministic_with_unbalanced_sets(dtype):
    """Most batches on one set, one set unused: three backward calls give bitwise-equal gradients."""
    _ext_cuda_ready()
    B, S, H, N, P, d = 64, 6, 12, 197, 50, 64
    index = torch.zeros(B, dtype=torch.long)
    index[::9] = torch.arange(1, 1 + len(index[::9])) % (S - 1)
    index = index.cuda()
    args = _ext_index_inputs(B, S, H, N, P, d, 0, dtype=dtype, device="cuda")
    out, lse, first = _ext_index_run(*args, d ** -0.5, prompt_index=index)
    assert torch.equal(first[3][S - 1], torch.zeros_like(first[3][S - 1]))
    for _ in range(2):
        again = cuda_impl.attention_bwd(args[6], *args[:5], out, lse, d ** -0.5, None, prompt_index=index)
        for name, x, y in zip(GRAD_NAMES, first, again):
            if not torch.equal(x, y):
                raise AssertionError(f"{name}: {int((x != y).sum())} of {x.numel()} elements differ")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("indexed", [False, True], ids=["grouped", "indexed"])
def test_cuda_dqkv_equals_separate_buffers(dtype, indexed):
    _ext_cuda_ready()
    B, S, H, N, d = 8, 2, 4, 50, 64
    args = _ext_index_inputs(B, S, H, N, 9, d, 1, dtype=dtype, device="cuda")
    index = torch.tensor([1, 0, 0, 1, 1, 1, 0, 1], device="cuda") if indexed else None
    sep = _ext_index_run(*args, 0.125, prompt_index=index)[2]
    dqkv = torch.full((B, N, 3, H, d), float("nan"), device="cuda", dtype=dtype)
    got = _ext_index_run(*args, 0.125, prompt_index=index, dqkv=dqkv)[2]
    for i, name in enumerate(GRAD_NAMES):
        assert torch.equal(got[i], sep[i]), name
    for i in range(3):
        assert got[i].data_ptr() == dqkv[:, :, i].data_ptr()


@pytest.mark.gpu
def test_cuda_bad_index_and_dqkv_raise():
    _ext_cuda_ready()
    q, k, v, pk, pv, _, dout = _ext_index_inputs(4, 3, 2, 16, 5, 64, 0, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match=r"prompt_index must be on q's device cuda"):
        cuda_impl.attention_fwd(q, k, v, pk, pv, 1.0, prompt_index=torch.tensor([0, 1, 2, 0]))
    index = torch.tensor([0, 1, 2, 0], device="cuda")
    out, lse = cuda_impl.attention_fwd(q, k, v, pk, pv, 1.0, prompt_index=index)
    base = torch.empty(4 * 16 * 3 * 2 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"dqkv must be 16-byte aligned"):
        cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 1.0, prompt_index=index,
                                dqkv=base[1:].view(4, 16, 3, 2, 64))
