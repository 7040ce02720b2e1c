"""The C++/CUDA extension `vpt_fast._C` (csrc/, backend module `vpt_fast.backends.cuda_impl`).

CPU: the extension is built (ext_info), its CPU twin equals `torch_impl` in float64 (forward and every
gradient; odd lengths, P in {0, 1, 7, 50}, prompt batch Bp in {1, 2, B}, bias on/off, non-contiguous
views), every argument check raises a clear error, torch.compile(fullgraph=True) traces the ops through
their fake implementations and FlopCounterMode counts them.
GPU (`@pytest.mark.gpu`): FlashAttention's rule (docs/design.md §5) for the CUDA kernels in bf16/fp16
against float64, head dims 32/64/80/128, ViT-B shapes with shared and per-sample prompts, Swin-like
windows with bias, fp32 exactness, bitwise determinism of the forward and of every gradient (the
prompt gradients too, for the cuda and triton backends), and the compiled architectures.
"""
import os

import pytest
import torch

from utils import assert_close
from vpt_fast.backends import torch_impl

cuda_impl = pytest.importorskip("vpt_fast.backends.cuda_impl")
needs_ext = pytest.mark.skipif(not cuda_impl.AVAILABLE, reason="vpt_fast._C is not built")
GRADS = ("dq", "dk", "dv", "dpk", "dpv")


def _inputs(B, H, Nq, Nk, P, Bp, d, nb, dtype=torch.float64, device="cpu", views=True, seed=0):
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


def _run(impl, q, k, v, pk, pv, bias, dout, scale):
    out, lse = impl.attention_fwd(q, k, v, pk, pv, scale, bias)
    return out, lse, impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)


def _reference(q, k, v, pk, pv, bias, dout, scale):
    """torch_impl's math path in float64 on the CPU."""
    f64 = [None if t is None else t.detach().double().cpu() for t in (q, k, v, pk, pv, bias, dout)]
    old, torch_impl._FORCE_MATH = torch_impl._FORCE_MATH, True
    try:
        return _run(torch_impl, *f64, scale)
    finally:
        torch_impl._FORCE_MATH = old


def _check_exact(args, scale, tol):
    out, lse, grads = _run(cuda_impl, *args, scale)
    r_out, r_lse, r_grads = _reference(*args, scale)
    q = args[0]
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == q.shape[:3]
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert_close(out.cpu(), r_out, tol, tol, "out")
    assert_close(lse.cpu(), r_lse, tol, tol, "lse")
    for name, g, r in zip(GRADS, grads, r_grads):
        if r is None:
            assert g is None, f"{name} must be None without prompts"
            continue
        assert g.shape == r.shape and g.dtype == q.dtype, f"{name}: {g.shape} {g.dtype}"
        assert_close(g.cpu(), r, tol, tol, name)


# ------------------------------------------------------------------------------------------------
# build
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# CPU twin == torch_impl (float64)
# ------------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("P,Bp", [(0, 1), (1, 1), (7, 1), (7, 2), (7, 4), (1, 4), (50, 2)])
@pytest.mark.parametrize("nb", [0, 1, 2], ids=["nobias", "bias1", "bias2"])
def test_cpu_twin_float64(P, Bp, nb):
    args = _inputs(4, 2, 13, 13, P, Bp, 16, nb)
    _check_exact(args, 16 ** -0.5, 1e-10)


@needs_ext
@pytest.mark.parametrize("Nq,Nk,P,d,nb", [(13, 20, 7, 32, 1), (33, 17, 0, 16, 2), (5, 1, 3, 64, 0),
                                          (17, 13, 5, 80, 1), (9, 9, 200, 128, 0), (3, 0, 5, 8, 0),
                                          (1, 1, 1, 3, 0)])
def test_cpu_twin_shapes(Nq, Nk, P, d, nb):
    """Nq != Nk, a single key, only prompt keys (Nk = 0), odd head dims, P = 200."""
    args = _inputs(2, 2, Nq, Nk, P, 1, d, nb, views=False, seed=1)
    _check_exact(args, 0.3, 1e-10)


@needs_ext
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2),
                                       (torch.float16, 5e-3)])
def test_cpu_twin_low_precision(dtype, tol):
    """float32 accumulation: only the final rounding to the input dtype differs from float64."""
    args = _inputs(4, 2, 13, 13, 7, 2, 16, 2, dtype=dtype)
    _check_exact(args, 0.25, tol)


@needs_ext
def test_cpu_twin_empty_prompt_segment_equals_none():
    q, k, v, pk, pv, bias, dout = _inputs(2, 2, 5, 5, 3, 1, 8, 1)
    a = _run(cuda_impl, q, k, v, None, None, bias, dout, 0.5)
    b = _run(cuda_impl, q, k, v, pk[:, :, :0], pv[:, :, :0], bias, dout, 0.5)
    assert_close(a[0], b[0], 0, 0, "out")
    for name, x, y in zip(GRADS[:3], a[2][:3], b[2][:3]):
        assert_close(x, y, 0, 0, name)
    assert b[2][3].shape == pk[:, :, :0].shape


@needs_ext
def test_cpu_twin_views_equal_contiguous_and_output_layout():
    q, k, v, pk, pv, bias, dout = _inputs(2, 3, 13, 13, 7, 1, 16, 1, dtype=torch.float32)
    assert not q.is_contiguous() and not pk.is_contiguous()
    a = _run(cuda_impl, q, k, v, pk, pv, bias, dout, 0.25)
    c = [None if t is None else t.contiguous() for t in (q, k, v, pk, pv, bias, dout)]
    b = _run(cuda_impl, *c, 0.25)
    assert_close(a[0], b[0], 0, 0, "out")
    for name, x, y in zip(GRADS, a[2], b[2]):
        assert_close(x, y, 0, 0, name)
    out = a[0]  # (B, H, N, d) view of a (B, N, H, d) buffer: the head merge is free
    assert out.transpose(1, 2).is_contiguous()


@needs_ext
def test_cpu_twin_backward_is_deterministic():
    """The shared prompt segment's gradients are summed over the batch in a fixed order."""
    q, k, v, pk, pv, bias, dout = _inputs(16, 2, 13, 13, 7, 1, 16, 2, dtype=torch.float32)
    out, lse = cuda_impl.attention_fwd(q, k, v, pk, pv, 0.25, bias)
    first = cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25, bias)
    again = cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25, bias)
    for name, x, y in zip(GRADS, first, again):
        assert torch.equal(x, y), name


@needs_ext
def test_cpu_twin_matches_prompt_attention_autograd():
    """Through the public op (autograd.Function) with backend="cuda" on the CPU."""
    from vpt_fast.ops.attention import prompt_attention
    q, k, v, pk, pv, bias, dout = _inputs(4, 2, 9, 9, 5, 2, 8, 2)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out = prompt_attention(*leaves, scale=0.4, bias=bias, backend="cuda")
    grads = torch.autograd.grad(out, leaves, dout)
    r_out, _, r_grads = _reference(q, k, v, pk, pv, bias, dout, 0.4)
    assert_close(out, r_out, 1e-10, 1e-10, "out")
    for name, g, r in zip(GRADS, grads, r_grads):
        assert_close(g, r, 1e-10, 1e-10, name)


# ------------------------------------------------------------------------------------------------
# argument checks (C++ TORCH_CHECK_VALUE/TYPE -> ValueError/TypeError naming argument and values)
# ------------------------------------------------------------------------------------------------
@needs_ext
def test_bad_inputs_raise_clear_errors():
    f, b = cuda_impl.attention_fwd, cuda_impl.attention_bwd
    q, k, v, pk, pv, bias, dout = _inputs(4, 2, 13, 13, 7, 2, 16, 2, dtype=torch.float32, views=False)
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
    q, k, v, pk, pv, bias, dout = _inputs(2, 2, 13, 13, 7, 1, 48, 0, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match=r"head dim on CUDA: expected d in \{32, 64, 80, 128\}, got d=48"):
        cuda_impl.attention_fwd(q, k, v, pk, pv, 1.0)
    x = torch.zeros(1, 1, 4, 64, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match=r"float32, float16 or bfloat16 \(CUDA\), got Double"):
        cuda_impl.attention_fwd(x, x, x, None, None, 1.0)
    y = torch.zeros(1, 1, 4, 64, device="cuda")
    with pytest.raises(ValueError, match=r"k must be on q's device cuda"):
        cuda_impl.attention_fwd(y, y.cpu(), y.cpu(), None, None, 1.0)


# ------------------------------------------------------------------------------------------------
# torch.compile and FLOP counting
# ------------------------------------------------------------------------------------------------
@needs_ext
def test_torch_compile_fullgraph_through_fake_impls():
    q, k, v, pk, pv, bias, dout = _inputs(2, 2, 13, 13, 7, 2, 16, 1, dtype=torch.float32)

    def f(q, k, v, pk, pv, bias, dout):
        out, lse = cuda_impl.attention_fwd(q, k, v, pk, pv, 0.25, bias)
        return (out,) + tuple(cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25, bias))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, want = compiled(q, k, v, pk, pv, bias, dout), f(q, k, v, pk, pv, bias, dout)
    for name, x, y in zip(("out",) + GRADS, got, want):
        assert x.shape == y.shape and x.stride() == y.stride(), name
        assert_close(x, y, 1e-6, 1e-6, name)


@needs_ext
def test_fake_impls_match_real_shapes_strides_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    for P in (0, 5):
        args = _inputs(4, 2, 9, 11, P, 2, 8, 2, dtype=torch.float32, views=False)
        q, k, v, pk, pv, bias, dout = args
        real = _run(cuda_impl, *args, 0.5)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fargs = [None if t is None else mode.from_tensor(t) for t in args]
            fake = _run(cuda_impl, *fargs, 0.5)
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
    q, k, v, pk, pv, bias, dout = _inputs(2, 2, 13, 13, 7, 1, 16, 0, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        out, lse = cuda_impl.attention_fwd(q, k, v, pk, pv, 0.25)
        cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.25)
    fwd = 4 * 2 * 2 * 13 * (7 + 13) * 16
    assert counter.get_total_flops() == fwd + fwd * 5 // 2


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA kernels
# ------------------------------------------------------------------------------------------------
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


@pytest.mark.gpu
def test_cuda_unaligned_views_and_layout():
    """Offsets that break 16-byte alignment take the scalar load path; results match contiguous."""
    _cuda_ready()
    q, k, v, pk, pv, bias, dout = _inputs(2, 3, 37, 37, 5, 1, 64, 1, dtype=torch.bfloat16, device="cuda")
    base = torch.randn(2 * 3 * 37 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    q_odd = base[1:].view(2, 3, 37, 64)  # 2-byte offset: not 16-byte aligned
    q_odd.copy_(q)
    a = _run(cuda_impl, q_odd, k, v, pk, pv, bias, dout, 0.125)
    b = _run(cuda_impl, q.contiguous(), k, v, pk, pv, bias, dout, 0.125)
    assert_close(a[0], b[0], 0, 0, "out")
    for name, x, y in zip(GRADS, a[2], b[2]):  # same arithmetic in the same order: bitwise equal
        assert_close(x, y, 0, 0, name)
    assert a[0].transpose(1, 2).is_contiguous()


@pytest.mark.gpu
def test_cuda_matches_cpu_twin_and_is_deterministic_forward():
    _cuda_ready()
    args = _inputs(4, 2, 50, 50, 9, 2, 64, 2, dtype=torch.float32, device="cuda")
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
    q, k, v, pk, pv, bias, dout = _inputs(B, H, N, N, P, Bp, d, nb, dtype=torch.bfloat16, device="cuda")
    scale = d ** -0.5
    out, lse = impl.attention_fwd(q, k, v, pk, pv, scale, bias)
    first = impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)
    assert first[3].shape == pk.shape and torch.isfinite(first[3]).all() and first[3].abs().sum() > 0
    for _ in range(2):
        again = impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, scale, bias)
        for name, x, y in zip(GRADS, first, again):
            if not torch.equal(x, y):
                raise AssertionError(f"{backend} {name}: {int((x != y).sum())} of {x.numel()} elements "
                                     f"differ between two backward calls on the same inputs")


@pytest.mark.gpu
def test_cuda_torch_compile_inductor():
    _cuda_ready()
    args = _inputs(2, 2, 33, 33, 7, 1, 64, 1, dtype=torch.bfloat16, device="cuda")

    def f(q, k, v, pk, pv, bias, dout):
        out, lse = cuda_impl.attention_fwd(q, k, v, pk, pv, 0.125, bias)
        return (out,) + tuple(cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.125, bias))

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*args)
    want = f(*args)
    for name, x, y in zip(("out",) + GRADS, got, want):
        assert_close(x.float(), y.float(), 1e-2, 1e-2, name)
