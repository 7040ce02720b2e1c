"""Prompt-aware attention primitives of the triton (and cuda) backends against `torch_impl` in float64.

On the CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest.py), with
small shapes; `@pytest.mark.gpu` tests use ViT-B shapes and check bf16/fp16 with FlashAttention's
rule (error <= 2x the error of eager PyTorch in the same precision, docs/design.md §5).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from utils import assert_close, assert_flash_rule, eager_attention_low_precision, rel_error
from vpt_fast.backends import backend_module, torch_impl

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


def _naive_prompt_attention(q, k, v, pk, pv, bias, dout, scale):
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
    monkeypatch.setattr(torch_impl, "_FORCE_MATH", path.startswith("math"))
    monkeypatch.setattr(torch_impl, "_CPU_ONE_CALL", path == "one_call_fp32")
    q, k, v, pk, pv, bias, dout = _inputs(B, H, Nq, Nk, P, max(Bp, 1), d, nb, dtype, views=views, device="cpu",
                                          seed=sum(shape))
    if Bp == 0:
        pk = pv = None
    scale = d ** -0.5
    want_out, want_lse, want_grads = _naive_prompt_attention(q, k, v, pk, pv, bias, dout, scale)
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
    monkeypatch.setattr(torch_impl, "_CPU_ONE_CALL", False)
    B, H, Nq, Nk, P, Bp, d, nb = shape
    args = _inputs(B, H, Nq, Nk, P, Bp, d, nb, dtype, device="cpu", seed=sum(shape))
    q, k, v, pk, pv, bias, dout = args
    scale = d ** -0.5
    want_out, _, want_grads = _naive_prompt_attention(*args, scale)
    out, lse = torch_impl.attention_fwd(q, k, v, pk, pv, scale, bias)
    grads = torch_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    kk, vv = torch_impl._joint_kv(leaves[1], leaves[2], leaves[3], leaves[4])
    mask = torch_impl._joint_bias(bias, B, P)
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
        out, lse = torch_impl._fused_attention_fwd(kernel, q, k, v, pk, pv, 0.2, bias)
        grads = torch_impl._fused_attention_bwd(kernel, torch.empty_like(out), q, k, v, pk, pv, out, lse, 0.2, bias)
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
def test_prompt_attention_with_index_matches_reference(backend, case):
    """The op (autograd) with prompt_index: output and the gradients of q, k, v, pk, pv against the
    float64 reference, for every backend."""
    from vpt_fast.ops.attention import prompt_attention
    backend = _op_backend(backend)
    q, k, v, pk, pv, bias, dout, index = _indexed_inputs(case, seed=5)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out = prompt_attention(*leaves, scale=0.3, bias=bias, backend=backend, prompt_index=index)
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
def test_prompt_attention_qkv_gradient_is_the_backend_buffer(backend, indexed, monkeypatch):
    """prompt_attention_qkv equals prompt_attention on the q, k, v views (output and every gradient),
    and the gradient autograd delivers to qkv is the very buffer the backend filled: no stacking
    or copying of separate dq, dk, dv."""
    from vpt_fast.backends import resolve
    from vpt_fast.ops.attention import prompt_attention, prompt_attention_qkv
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
    want = prompt_attention(q, k, v, leaves[1], leaves[2], scale=0.3, backend=backend, prompt_index=index)
    want_grads = torch.autograd.grad(want, leaves, dout)

    impl = resolve(backend, "attention", qkv.device)
    recorder = _RecordDqkv(impl.attention_bwd)
    monkeypatch.setattr(impl, "attention_bwd", recorder)
    leaves = [t.clone().requires_grad_() for t in (qkv, pk, pv)]
    delivered = []
    leaves[0].register_hook(delivered.append)
    out = prompt_attention_qkv(leaves[0], leaves[1], leaves[2], scale=0.3, backend=backend, prompt_index=index)
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
    from vpt_fast.ops.attention import prompt_attention, prompt_attention_qkv
    q, k, v, pk, pv, _, _, index = _indexed_inputs("S3_B5_unused_set")
    qkv = torch.randn(5, 11, 3, 2, 16, device=DEVICE)
    for call in (lambda i: prompt_attention(q, k, v, pk, pv, prompt_index=i),
                 lambda i: prompt_attention_qkv(qkv, pk, pv, prompt_index=i)):
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
        prompt_attention(q, k, v, prompt_index=index)
    with pytest.raises(ValueError, match=r"\(S, H=2, P, d=16\)"):
        prompt_attention(q, k, v, pk[:, :1], pv[:, :1], prompt_index=index)
    # int32 is accepted by the op (cast once); the backends take int64 only
    out32 = prompt_attention(q, k, v, pk, pv, prompt_index=index.int())
    assert torch.equal(out32, prompt_attention(q, k, v, pk, pv, prompt_index=index))


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
def test_prompt_attention_with_index_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces prompt_attention with an index (torch backend, CPU) and its
    backward; the range check becomes an asynchronous assert that still fires."""
    from vpt_fast.ops.attention import prompt_attention
    q, k, v, pk, pv, bias, dout, index = _indexed_inputs("S3_B5_unused_set")
    q, k, v, pk, pv, bias, dout, index = (t.cpu() if t is not None else None
                                          for t in (q, k, v, pk, pv, bias, dout, index))

    def f(q, k, v, pk, pv, index):
        return prompt_attention(q, k, v, pk, pv, scale=0.3, backend="torch", prompt_index=index)

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
