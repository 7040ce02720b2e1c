"""The C++/CUDA extension's prompt-set index and qkv-gradient buffer (`vpt_fast._C`, backend module
`vpt_fast.backends.cuda_impl`).

`prompt_index` (int64 (B,)): query batch b reads prompt set prompt_index[b] of pk, pv (S, H, P, d)
inside the kernels; dpk, dpv (S, H, P, d) are each set's sum over the batches reading it, in a fixed
order. `dqkv` (B, N, 3, H, d): the backward writes dq, dk, dv into its views.

CPU (the C++ twin): indexed equals the float64 reference on gathered per-sample prompts (forward and
every gradient; S not dividing B, unused sets, all batches on one set), equals the twin itself on
the gathered copy (bitwise, the per-set sum taken in batch order), unused sets get exact zeros,
gradients are bitwise reproducible, dqkv equals the separate buffers bitwise, bad arguments raise,
torch.compile traces both through the fake implementations.
GPU (`@pytest.mark.gpu`): the same for the CUDA kernels in float32, float16 and bfloat16.
"""
import pytest
import torch

from utils import assert_close
from vpt_fast.backends import torch_impl

cuda_impl = pytest.importorskip("vpt_fast.backends.cuda_impl")
needs_ext = pytest.mark.skipif(not cuda_impl.AVAILABLE, reason="vpt_fast._C is not built")
GRADS = ("dq", "dk", "dv", "dpk", "dpv")

# (B, S, index): S not dividing B with an unused set, one set for all batches, a permutation, and
# sets in decreasing order (the per-set order is not the batch order)
INDEXES = {"uneven": (5, 3, [2, 0, 2, 2, 0]), "one-set": (4, 3, [1, 1, 1, 1]),
           "permutation": (4, 4, [3, 0, 2, 1]), "decreasing": (6, 4, [3, 3, 2, 1, 1, 0])}


def _inputs(B, S, H, N, P, d, nb, dtype=torch.float64, device="cpu", seed=0):
    """q, k, v as views of one (B, N, 3, H, d) qkv buffer, pk (S, H, P, d) non-contiguous, pv, bias,
    dout."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    q, k, v = rnd(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    pk, pv = rnd(S, P, H, d).transpose(1, 2), rnd(S, H, P, d)
    bias = rnd(nb, H, N, N) if nb else None
    return q, k, v, pk, pv, bias, rnd(B, H, N, d)


def _run(q, k, v, pk, pv, bias, dout, scale, prompt_index=None, dqkv=None):
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


def _reference(q, k, v, pk, pv, bias, dout, scale, index):
    """torch_impl's math path in float64 on the CPU with gathered per-batch prompts (Bp = B)."""
    f64 = [None if t is None else t.detach().double().cpu() for t in (q, k, v, pk, pv, bias, dout)]
    q, k, v, pk, pv, bias, dout = f64
    index = index.cpu()
    old, torch_impl._FORCE_MATH = torch_impl._FORCE_MATH, True
    try:
        out, lse = torch_impl.attention_fwd(q, k, v, pk[index], pv[index], scale, bias)
        dq, dk, dv, dpk, dpv = torch_impl.attention_bwd(dout, q, k, v, pk[index], pv[index], out, lse,
                                                        scale, bias)
    finally:
        torch_impl._FORCE_MATH = old
    S = pk.shape[0]
    return out, lse, (dq, dk, dv, _per_set_sum(dpk, index, S), _per_set_sum(dpv, index, S))


def _check_against_reference(args, index, scale, tol):
    out, lse, grads = _run(*args, scale, prompt_index=index)
    r_out, r_lse, r_grads = _reference(*args, scale, index)
    q, pk = args[0], args[3]
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert_close(out.cpu(), r_out, tol, tol, "out")
    assert_close(lse.cpu(), r_lse, tol, tol, "lse")
    for name, g, r in zip(GRADS, grads, r_grads):
        assert g.shape == r.shape and g.dtype == q.dtype, f"{name}: {tuple(g.shape)} {g.dtype}"
        assert_close(g.cpu(), r, tol, tol, name)
    assert grads[3].shape == pk.shape


# ------------------------------------------------------------------------------------------------
# CPU twin
# ------------------------------------------------------------------------------------------------
@needs_ext
def test_schema_has_the_index_and_the_mutated_qkv_gradient():
    fwd = str(torch.ops.vpt_fast.attention_fwd.default._schema)
    bwd = str(torch.ops.vpt_fast.attention_bwd.default._schema)
    assert "Tensor? prompt_index=None" in fwd and "Tensor? prompt_index=None" in bwd
    assert "Tensor(a!)? dqkv=None" in bwd
    assert torch.ops.vpt_fast.attention_bwd.default._schema.is_mutable


@needs_ext
@pytest.mark.parametrize("case", list(INDEXES))
@pytest.mark.parametrize("P,nb", [(7, 0), (1, 1)], ids=["P7", "P1-bias"])
def test_cpu_indexed_equals_gathered_reference_float64(case, P, nb):
    B, S, index = INDEXES[case]
    args = _inputs(B, S, 2, 9, P, 8, nb)
    _check_against_reference(args, torch.tensor(index), 8 ** -0.5, 1e-10)


@needs_ext
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_cpu_indexed_low_precision(dtype, tol):
    B, S, index = INDEXES["decreasing"]
    args = _inputs(B, S, 2, 11, 5, 16, 2, dtype=dtype)
    _check_against_reference(args, torch.tensor(index), 0.25, tol)


@needs_ext
def test_cpu_indexed_equals_the_twin_on_gathered_prompts_bitwise():
    """The index only moves a pointer: out, lse, dq, dk, dv equal the gathered run bit for bit, and
    each set's prompt gradient is the per-batch gradients added in batch order (float32)."""
    B, S, index = INDEXES["uneven"]
    q, k, v, pk, pv, bias, dout = _inputs(B, S, 3, 13, 7, 16, 1, dtype=torch.float32)
    index = torch.tensor(index)
    out, lse, grads = _run(q, k, v, pk, pv, bias, dout, 0.25, prompt_index=index)
    g_out, g_lse, g_grads = _run(q, k, v, pk[index], pv[index], bias, dout, 0.25)
    assert torch.equal(out, g_out) and torch.equal(lse, g_lse)
    for name, x, y in zip(GRADS[:3], grads[:3], g_grads[:3]):
        assert torch.equal(x, y), name
    assert torch.equal(grads[3], _per_set_sum(g_grads[3], index, S))
    assert torch.equal(grads[4], _per_set_sum(g_grads[4], index, S))


@needs_ext
def test_cpu_unused_sets_get_exact_zeros_and_grads_are_reproducible():
    B, S, index = 6, 5, torch.tensor([4, 1, 4, 1, 1, 4])
    args = _inputs(B, S, 2, 9, 7, 8, 0, dtype=torch.float32)
    first = _run(*args, 0.3, prompt_index=index)[2]
    for name in ("dpk", "dpv"):
        g = first[GRADS.index(name)]
        assert torch.equal(g[[0, 2, 3]], torch.zeros_like(g[[0, 2, 3]])), name
        assert g[[1, 4]].abs().amin() > 0, name
    again = _run(*args, 0.3, prompt_index=index)[2]
    for name, x, y in zip(GRADS, first, again):
        assert torch.equal(x, y), name


@needs_ext
def test_cpu_index_with_an_empty_prompt_segment():
    """P == 0: no prompt keys; zero-size prompt gradients of pk's shape."""
    q, k, v, pk, pv, bias, dout = _inputs(3, 2, 2, 5, 1, 8, 0)
    index = torch.tensor([1, 0, 1])
    a = _run(q, k, v, pk[:, :, :0], pv[:, :, :0], bias, dout, 0.5, prompt_index=index)
    b = _run(q, k, v, None, None, bias, dout, 0.5)
    assert torch.equal(a[0], b[0])
    assert a[2][3].shape == (2, 2, 0, 8) and a[2][4].shape == (2, 2, 0, 8)


@needs_ext
@pytest.mark.parametrize("indexed", [False, True], ids=["grouped", "indexed"])
def test_cpu_dqkv_equals_separate_buffers(indexed):
    """dq, dk, dv land in the views of one (B, N, 3, H, d) buffer, bit for bit as returned
    separately; the returned gradients are those views."""
    B, S, H, N, d = 4, 2, 3, 11, 16
    q, k, v, pk, pv, bias, dout = _inputs(B, S, H, N, 7, d, 2, dtype=torch.float32)
    index = torch.tensor([1, 0, 0, 1]) if indexed else None
    sep = _run(q, k, v, pk, pv, bias, dout, 0.25, prompt_index=index)[2]
    dqkv = torch.full((B, N, 3, H, d), float("nan"))
    got = _run(q, k, v, pk, pv, bias, dout, 0.25, prompt_index=index, dqkv=dqkv)[2]
    for i, name in enumerate(GRADS[:3]):
        assert torch.equal(got[i], sep[i]), name
        assert got[i].data_ptr() == dqkv[:, :, i].data_ptr() and got[i].stride() == (N * 3 * H * d, d, 3 * H * d, 1)
        assert torch.equal(dqkv[:, :, i].transpose(1, 2), sep[i]), name
    assert torch.equal(got[3], sep[3]) and torch.equal(got[4], sep[4])


@needs_ext
def test_cpu_dqkv_without_prompts_and_without_bias():
    q, k, v, _, _, _, dout = _inputs(2, 1, 2, 7, 1, 8, 0, dtype=torch.float32)
    sep = _run(q, k, v, None, None, None, dout, 0.5)[2]
    dqkv = torch.empty(2, 7, 3, 2, 8)
    got = _run(q, k, v, None, None, None, dout, 0.5, dqkv=dqkv)[2]
    assert got[3] is None and got[4] is None
    for i, name in enumerate(GRADS[:3]):
        assert torch.equal(got[i], sep[i]), name


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------
@needs_ext
def test_bad_index_and_dqkv_arguments_raise():
    f, b = cuda_impl.attention_fwd, cuda_impl.attention_bwd
    q, k, v, pk, pv, bias, dout = _inputs(4, 3, 2, 9, 5, 8, 0, dtype=torch.float32)
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


# ------------------------------------------------------------------------------------------------
# torch.compile, fake implementations, FLOPs
# ------------------------------------------------------------------------------------------------
@needs_ext
def test_torch_compile_fullgraph_with_index_and_dqkv():
    B, S, index = INDEXES["uneven"]
    q, k, v, pk, pv, bias, dout = _inputs(B, S, 2, 9, 7, 8, 1, dtype=torch.float32)
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
    for name, x, y in zip(("out", "2 dqkv") + GRADS, got, want):
        assert x.shape == y.shape and x.stride() == y.stride(), name
        assert_close(x, y, 1e-6, 1e-6, name)


@needs_ext
@pytest.mark.parametrize("with_dqkv", [False, True], ids=["separate", "dqkv"])
def test_fake_impls_match_real_with_index(with_dqkv):
    from torch._subclasses.fake_tensor import FakeTensorMode
    B, S, index = INDEXES["uneven"]
    args = _inputs(B, S, 2, 9, 7, 8, 1, dtype=torch.float32)
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
    B, S, index = INDEXES["uneven"]
    q, k, v, pk, pv, _, dout = _inputs(B, S, 2, 9, 7, 8, 0, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        _run(q, k, v, pk, pv, None, dout, 0.25, prompt_index=torch.tensor(index))
    fwd = 4 * B * 2 * 9 * (7 + 9) * 8
    assert counter.get_total_flops() == fwd + fwd * 5 // 2


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA kernels
# ------------------------------------------------------------------------------------------------
def _cuda_ready():
    if not (cuda_impl.AVAILABLE and cuda_impl.WITH_CUDA):
        pytest.skip("vpt_fast._C built without CUDA kernels")


# relative tolerances against the float64 reference, and for the prompt gradients against the
# gathered per-batch gradients summed per set in float64
CUDA_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(CUDA_TOL), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(16, 5, 12, 197, 50, 64, 0), (24, 7, 4, 49, 10, 32, 4),
                                   (6, 4, 2, 37, 3, 80, 0), (5, 3, 2, 70, 65, 128, 1)],
                         ids=["vit-b", "swin-windows-bias", "d80", "d128-two-key-tiles"])
def test_cuda_indexed_equals_gathered(dtype, shape):
    """Forward and dq, dk, dv equal the gathered run bit for bit (the index only moves a pointer);
    dpk, dpv equal the gathered per-batch gradients summed per set; everything near float64."""
    _cuda_ready()
    B, S, H, N, P, d, nb = shape
    gen = torch.Generator().manual_seed(B)
    index = torch.randint(0, S - 1, (B,), generator=gen).cuda()  # set S - 1 unused
    args = _inputs(B, S, H, N, P, d, nb, dtype=dtype, device="cuda", seed=1)
    q, k, v, pk, pv, bias, dout = args
    scale = d ** -0.5
    out, lse, grads = _run(*args, scale, prompt_index=index)
    g_out, g_lse, g_grads = _run(q, k, v, pk[index], pv[index], bias, dout, scale)
    assert torch.equal(out, g_out) and torch.equal(lse, g_lse)
    for name, x, y in zip(GRADS[:3], grads[:3], g_grads[:3]):
        assert torch.equal(x, y), name
    tol = CUDA_TOL[dtype]
    for i in (3, 4):
        want = _per_set_sum(g_grads[i].double(), index, S)
        assert torch.equal(grads[i][S - 1], torch.zeros_like(grads[i][S - 1])), GRADS[i]
        scale_ = want.abs().amax().item()
        assert_close(grads[i].double(), want, tol * scale_, tol, GRADS[i])
    r_out, _, r_grads = _reference(*args, scale, index)
    assert_close(out.double().cpu(), r_out, tol, tol, "out")
    for name, g, r in zip(GRADS, grads, r_grads):
        assert_close(g.double().cpu(), r, tol * max(1.0, r.abs().amax().item()), tol, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_indexed_backward_is_deterministic_with_unbalanced_sets(dtype):
    """Most batches on one set, one set unused: three backward calls give bitwise-equal gradients."""
    _cuda_ready()
    B, S, H, N, P, d = 64, 6, 12, 197, 50, 64
    index = torch.zeros(B, dtype=torch.long)
    index[::9] = torch.arange(1, 1 + len(index[::9])) % (S - 1)
    index = index.cuda()
    args = _inputs(B, S, H, N, P, d, 0, dtype=dtype, device="cuda")
    out, lse, first = _run(*args, d ** -0.5, prompt_index=index)
    assert torch.equal(first[3][S - 1], torch.zeros_like(first[3][S - 1]))
    for _ in range(2):
        again = cuda_impl.attention_bwd(args[6], *args[:5], out, lse, d ** -0.5, None, prompt_index=index)
        for name, x, y in zip(GRADS, first, again):
            if not torch.equal(x, y):
                raise AssertionError(f"{name}: {int((x != y).sum())} of {x.numel()} elements differ")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("indexed", [False, True], ids=["grouped", "indexed"])
def test_cuda_dqkv_equals_separate_buffers(dtype, indexed):
    _cuda_ready()
    B, S, H, N, d = 8, 2, 4, 50, 64
    args = _inputs(B, S, H, N, 9, d, 1, dtype=dtype, device="cuda")
    index = torch.tensor([1, 0, 0, 1, 1, 1, 0, 1], device="cuda") if indexed else None
    sep = _run(*args, 0.125, prompt_index=index)[2]
    dqkv = torch.full((B, N, 3, H, d), float("nan"), device="cuda", dtype=dtype)
    got = _run(*args, 0.125, prompt_index=index, dqkv=dqkv)[2]
    for i, name in enumerate(GRADS):
        assert torch.equal(got[i], sep[i]), name
    for i in range(3):
        assert got[i].data_ptr() == dqkv[:, :, i].data_ptr()


@pytest.mark.gpu
def test_cuda_bad_index_and_dqkv_raise():
    _cuda_ready()
    q, k, v, pk, pv, _, dout = _inputs(4, 3, 2, 16, 5, 64, 0, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match=r"prompt_index must be on q's device cuda"):
        cuda_impl.attention_fwd(q, k, v, pk, pv, 1.0, prompt_index=torch.tensor([0, 1, 2, 0]))
    index = torch.tensor([0, 1, 2, 0], device="cuda")
    out, lse = cuda_impl.attention_fwd(q, k, v, pk, pv, 1.0, prompt_index=index)
    base = torch.empty(4 * 16 * 3 * 2 * 64 + 1, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"dqkv must be 16-byte aligned"):
        cuda_impl.attention_bwd(dout, q, k, v, pk, pv, out, lse, 1.0, prompt_index=index,
                                dqkv=base[1:].view(4, 16, 3, 2, 64))
