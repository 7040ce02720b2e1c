"""Fused residual add + LayerNorm (`add_layer_norm`): the triton primitives against `torch_impl` in
float64 and against the unfused path (add, then the `layer_norm` primitives); the autograd op and
the fused pre-norm MLP against autograd through the unfused ops; prompted ViTs and Swins that run it
against the reference backend, with no more bytes saved for backward than the unfused blocks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import utils
import vpt_fast
from utils import assert_close, assert_flash_rule, random_batch, tiny_vit
from vpt_fast.backends import backend_module, torch_impl
from vpt_fast.blocks import common as block_common
from vpt_fast.ops.add_layer_norm import add_layer_norm
from vpt_fast.ops.layer_norm import layer_norm
from vpt_fast.ops.mlp import add_norm_mlp, norm_mlp

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = [name for name in ("torch", "triton") if backend_module(name) is not None]
# `impl` (the triton backend module) comes from conftest.py


def _inputs(shape, dtype, branch_dtype=None, scaled=False, strided=False, device=DEVICE, seed=0):
    """residual, branch, scale, weight, bias, ds, dy; `strided`: residual rows are a slice of a wider
    buffer and the branch a transposed view (neither has the plain contiguous layout)."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    residual = torch.randn(*shape[:-1], C + 7, generator=g)[..., :C] if strided else torch.randn(*shape, generator=g)
    branch = torch.randn(*shape, generator=g) * 2 + 0.5
    if strided and len(shape) == 3:
        branch = branch.transpose(0, 1).contiguous().transpose(0, 1)
    scale = torch.rand(C, generator=g) + 0.1 if scaled else None
    weight, bias = torch.randn(C, generator=g), torch.randn(C, generator=g)
    ds, dy = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    cast = lambda t, dt=dtype: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    return (cast(residual), cast(branch, branch_dtype or dtype), cast(scale), cast(weight), cast(bias), cast(ds),
            cast(dy, branch_dtype or dtype))


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


def _unfused(impl, residual, branch, scale, weight, bias, eps, out_dtype=None):
    """The unfused path: torch's add, then `impl`'s LayerNorm primitives."""
    s = residual + (branch if scale is None else branch * scale)
    return (s, *impl.layer_norm_fwd(s, weight, bias, eps, out_dtype))


@pytest.mark.parametrize("shape", [(3, 5, 40), (7, 33), (2, 3, 4, 17), (1, 768)])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "layerscale"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_add_layer_norm_fp32(impl, shape, scaled, strided):
    """float32: within 1e-5 of float64, and equal to the unfused path (add, then the LayerNorm
    kernels; ds + LayerNorm's dX summed as autograd sums them)."""
    residual, branch, scale, w, b, ds, dy = _inputs(shape, torch.float32, scaled=scaled, strided=strided)
    s, y, mean, rstd = impl.add_layer_norm_fwd(residual, branch, scale, w, b, 1e-6)
    d_res, d_branch = impl.add_layer_norm_bwd(ds, dy, s, w, mean, rstd, scale, torch.float32)
    ref = _f64(residual, branch, scale, w, b, ds, dy)
    s_ref, y_ref, mean_ref, rstd_ref = torch_impl.add_layer_norm_fwd(*ref[:5], 1e-6)
    d_res_ref, d_branch_ref = torch_impl.add_layer_norm_bwd(ref[5], ref[6], s_ref, ref[3], mean_ref, rstd_ref,
                                                            ref[2], torch.float64)
    assert s.dtype == y.dtype == d_res.dtype == d_branch.dtype == torch.float32
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == shape[:-1]
    for name, got, want in [("s", s, s_ref), ("y", y, y_ref), ("mean", mean, mean_ref), ("rstd", rstd, rstd_ref),
                            ("d residual", d_res, d_res_ref), ("d branch", d_branch, d_branch_ref)]:
        assert_close(got, want, 1e-5, 1e-5, name)
    assert (d_branch is d_res) == (scale is None)  # one tensor written once when the branch needs nothing else

    s_u, y_u, mean_u, rstd_u = _unfused(impl, residual, branch, scale, w, b, 1e-6)
    d_res_u = ds + impl.layer_norm_bwd(dy, s_u, w, mean_u, rstd_u)
    d_branch_u = d_res_u if scale is None else d_res_u * scale
    exact = not HAS_CUDA  # the interpreter rounds every op; a GPU may contract a multiply-add into an fma
    for name, got, want in [("s", s, s_u), ("y", y, y_u), ("mean", mean, mean_u), ("rstd", rstd, rstd_u),
                            ("d residual", d_res, d_res_u), ("d branch", d_branch, d_branch_u)]:
        if exact:
            assert torch.equal(got, want), f"{name}: {utils.max_error(got, want):.3e} from the unfused path"
        else:
            assert_close(got, want, 1e-6, 1e-6, name)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "layerscale"])
def test_torch_impl_equals_unfused_autograd(scaled):
    """The torch primitives are bitwise timm's `x + ls(branch)` then LayerNorm, with autograd's grads."""
    residual, branch, scale, w, b, ds, dy = _inputs((4, 9, 24), torch.float32, branch_dtype=torch.bfloat16,
                                                    scaled=scaled, device="cpu")
    s, y, mean, rstd = torch_impl.add_layer_norm_fwd(residual, branch, scale, w, b, 1e-5, torch.bfloat16)
    d_res, d_branch = torch_impl.add_layer_norm_bwd(ds, dy, s, w, mean, rstd, scale, torch.bfloat16)
    res_a, branch_a = residual.clone().requires_grad_(), branch.clone().requires_grad_()
    s_a = res_a + (branch_a if scale is None else branch_a * scale)
    y_a = F.layer_norm(s_a, (24,), w, b, 1e-5).bfloat16()
    grads = torch.autograd.grad([s_a, y_a], [res_a, branch_a], [ds, dy])
    assert torch.equal(s, s_a) and torch.equal(y, y_a)
    assert torch.equal(d_res, grads[0]) and torch.equal(d_branch, grads[1])
    assert d_branch.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual_fp32", [True, False], ids=["fp32_stream", "low_stream"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "layerscale"])
def test_add_layer_norm_low_precision(impl, dtype, residual_fp32, scaled):
    """FlashAttention's rule against float64: at most 2x eager PyTorch's error in the same precision
    (a float32 residual stream with a low-precision branch, as under autocast; or all low precision).
    The interpreter truncates its half-precision stores (a GPU rounds): 1 ulp of slack there."""
    stream = torch.float32 if residual_fp32 else dtype
    residual, branch, scale, w, b, ds, dy = _inputs((3, 5, 40), stream, branch_dtype=dtype, scaled=scaled, seed=1)
    if scale is not None:
        scale = scale.to(stream)
    out_dtype = dtype if residual_fp32 else None
    s, y, mean, rstd = impl.add_layer_norm_fwd(residual, branch, scale, w, b, 1e-5, out_dtype)
    d_res, d_branch = impl.add_layer_norm_bwd(ds, dy, s, w, mean, rstd, scale, dtype)
    assert s.dtype == stream and y.dtype == dtype and d_res.dtype == stream and d_branch.dtype == dtype

    ref = _f64(residual, branch, scale, w, b, ds, dy)
    s_ref, y_ref, mean_ref, rstd_ref = torch_impl.add_layer_norm_fwd(*ref[:5], 1e-5)
    d_res_ref, d_branch_ref = torch_impl.add_layer_norm_bwd(ref[5], ref[6], s_ref, ref[3], mean_ref, rstd_ref,
                                                            ref[2], torch.float64)
    res_e, branch_e = residual.clone().requires_grad_(), branch.clone().requires_grad_()
    s_e = res_e + (branch_e if scale is None else branch_e * scale)
    y_e = F.layer_norm(s_e.float(), (40,), w.float(), b.float(), 1e-5).to(dtype)
    d_res_e, d_branch_e = torch.autograd.grad([s_e, y_e], [res_e, branch_e], [ds, dy])
    for name, got, want, eager in [("s", s, s_ref, s_e), ("y", y, y_ref, y_e),
                                   ("d residual", d_res, d_res_ref, d_res_e),
                                   ("d branch", d_branch, d_branch_ref, d_branch_e)]:
        ulp = torch.finfo(got.dtype).eps * want.abs().max().item()  # one ulp at the tensor's scale
        assert_flash_rule(got, want, eager, name, atol=1e-5 if HAS_CUDA else ulp)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 197, 768), (8, 49, 96), (4, 50, 1024)])
def test_add_layer_norm_gpu(impl, dtype, shape):
    """The model's shapes on the GPU: float32 stream + low-precision branch against float64."""
    residual, branch, scale, w, b, ds, dy = _inputs(shape, torch.float32, branch_dtype=dtype, scaled=True)
    s, y, mean, rstd = impl.add_layer_norm_fwd(residual, branch, scale, w, b, 1e-6, dtype)
    d_res, d_branch = impl.add_layer_norm_bwd(ds, dy, s, w, mean, rstd, scale, dtype)
    ref = _f64(residual, branch, scale, w, b, ds, dy)
    s_ref, y_ref, mean_ref, rstd_ref = torch_impl.add_layer_norm_fwd(*ref[:5], 1e-6)
    d_res_ref, d_branch_ref = torch_impl.add_layer_norm_bwd(ref[5], ref[6], s_ref, ref[3], mean_ref, rstd_ref,
                                                            ref[2], torch.float64)
    res_e, branch_e = residual.clone().requires_grad_(), branch.clone().requires_grad_()
    s_e = res_e + branch_e * scale
    y_e = F.layer_norm(s_e, shape[-1:], w, b, 1e-6).to(dtype)
    d_res_e, d_branch_e = torch.autograd.grad([s_e, y_e], [res_e, branch_e], [ds, dy])
    for name, got, want, eager in [("s", s, s_ref, s_e), ("y", y, y_ref, y_e),
                                   ("d residual", d_res, d_res_ref, d_res_e),
                                   ("d branch", d_branch, d_branch_ref, d_branch_e)]:
        assert_flash_rule(got, want, eager, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["both", "s_only", "y_only"])
def test_op_gradients_match_unfused_autograd(backend, used):
    """add_layer_norm (the autograd op) against autograd through the unfused ops, including outputs
    that get no gradient (None reaches backward: nothing is materialised)."""
    torch.manual_seed(4)
    norm = torch.nn.LayerNorm(24).requires_grad_(False)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    gamma = torch.rand(24) + 0.5
    residual, branch = torch.randn(2, 5, 24), torch.randn(2, 5, 24)

    def run(fused: bool):
        r, br = residual.clone().requires_grad_(), branch.clone().requires_grad_()
        if fused:
            s, y = add_layer_norm(r, br, norm, backend, scale=gamma)
        else:
            s = r + br * gamma
            y = layer_norm(s, norm, backend)
        outputs = {"both": s.sin().sum() + y.cos().sum(), "s_only": s.sin().sum(), "y_only": y.cos().sum()}[used]
        return (s, y, *torch.autograd.grad(outputs, [r, br]))

    for name, got, want in zip(["s", "y", "d residual", "d branch"], run(True), run(False)):
        assert_close(got, want, 1e-6, 1e-6, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [False, True], ids=["saved_fc1", "recompute_fc1"])
def test_add_norm_mlp_matches_unfused(backend, recompute):
    """add_norm_mlp (add fused into norm_mlp's LayerNorm) against the add then norm_mlp: same s, MLP
    output and residual/branch gradients; recompute="mlp" reruns LayerNorm on s to the same bits."""
    torch.manual_seed(5)
    block = tiny_vit(embed_dim=24, num_heads=2, init_values=0.5).blocks[0].requires_grad_(False)
    gamma = block.ls1.gamma
    residual, branch = torch.randn(2, 7, 24), torch.randn(2, 7, 24)

    def run(fused: bool, recompute_fc1: bool):
        r, br = residual.clone().requires_grad_(), branch.clone().requires_grad_()
        if fused:
            s, out = add_norm_mlp(r, br, gamma, block.norm2, block.mlp, recompute_fc1, backend)
        else:
            s = r + br * gamma
            out = norm_mlp(s, block.norm2, block.mlp, recompute_fc1, backend)
        return (s, out, *torch.autograd.grad((s * 0.5 + out).square().sum(), [r, br]))

    fused = run(True, recompute)
    for name, got, want in zip(["s", "out", "d residual", "d branch"], fused, run(False, recompute)):
        assert_close(got, want, 1e-6, 1e-6, name)
    if recompute:
        assert all(torch.equal(a, b) for a, b in zip(fused, run(True, False)))


def _vit(variant: str, deep: bool):
    torch.manual_seed(0)
    kwargs = utils.VIT_VARIANTS[variant]
    model = vpt_fast.prompt(tiny_vit(img_size=16, embed_dim=32, depth=2, num_heads=2, **kwargs), num_prompts=3,
                            deep=deep)
    with torch.no_grad():
        model.vpt.prompts.normal_(0, 0.5)
        model.head.weight.normal_(0, 0.5)
    return model.train()


def _graph_names(t: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def _assert_fused_and_matches_reference(model, backend: str, x, y) -> None:
    """The fused op is in the autograd graph, and logits and prompt/head gradients are within 1e-5
    (relative) of the reference backend."""
    assert "FrozenAddNormMlpBackward" in _graph_names(model(x))
    ref_logits, ref_grads = utils.training_results(model, "reference", x, y)
    logits, grads = utils.training_results(model, backend, x, y)
    assert utils.rel_error(logits, ref_logits) < 1e-5
    for name, grad in grads.items():
        assert utils.rel_error(grad, ref_grads[name]) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("variant", ["cls_token", "layerscale_qknorm"])
def test_vit_with_fused_add_matches_reference(backend, variant, deep):
    """A prompted ViT whose blocks run the fused add: logits and prompt/head gradients within 1e-5
    (relative) of the reference backend, and the fused op is in the autograd graph."""
    model = _vit(variant, deep)
    x, y = random_batch(model, 2)
    vpt_fast.set_backend(model, backend)
    _assert_fused_and_matches_reference(model, backend, x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vit_with_unfusable_mlp_uses_the_op(backend):
    """An MLP that norm_mlp cannot take (tanh GELU): the add still joins norm2 (`add_layer_norm`),
    timm's MLP runs on y, and the model matches the reference."""
    torch.manual_seed(0)
    model = vpt_fast.prompt(tiny_vit(img_size=16, embed_dim=32, depth=2, num_heads=2, act_layer="gelu_tanh"),
                            num_prompts=3, deep=True).train()
    utils.randomize(model)
    x, y = random_batch(model, 2)
    vpt_fast.set_backend(model, backend)
    names = _graph_names(model(x))
    assert "FrozenAddLayerNormBackward" in names and "FrozenAddNormMlpBackward" not in names
    ref_logits, ref_grads = utils.training_results(model, "reference", x, y)
    logits, grads = utils.training_results(model, backend, x, y)
    assert utils.rel_error(logits, ref_logits) < 1e-5
    for name, grad in grads.items():
        assert utils.rel_error(grad, ref_grads[name]) < 1e-5, name


def test_cuda_backend_runs_the_op_through_its_fallback():
    """The cuda backend has no add_layer_norm of its own: triton runs it on CUDA tensors, torch on CPU."""
    from vpt_fast.backends import resolve
    if backend_module("cuda") is None:
        pytest.skip("cuda backend not available")
    assert resolve("cuda", "add_layer_norm", torch.device("cpu")) is torch_impl
    if HAS_CUDA and backend_module("triton") is not None:
        assert resolve("cuda", "add_layer_norm", torch.device("cuda")) is backend_module("triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vit_fused_equals_unfused_and_saves_no_more(backend, monkeypatch):
    """The same prompted ViT with the add fused and unfused (every recompute mode): equal logits and
    gradients (bitwise for the torch backend), and no more bytes saved for backward."""
    from vpt_fast.bench import BenchConfig, saved_activation_bytes
    model = _vit("layerscale_qknorm", deep=True)
    x, y = random_batch(model, 2)
    cfg = BenchConfig(model="tiny", batch=2)
    for recompute in ("none", "mlp"):
        vpt_fast.set_backend(model, backend, recompute=recompute)
        fused = utils.training_results(model, backend, x, y)
        fused_bytes = saved_activation_bytes(model, x, cfg)
        with monkeypatch.context() as patch:
            patch.setattr(block_common, "branch_scale", lambda ls, drop_path: (False, None))
            unfused = utils.training_results(model, backend, x, y)
            unfused_bytes = saved_activation_bytes(model, x, cfg)
        assert 0 < fused_bytes <= unfused_bytes, f"recompute={recompute}: {fused_bytes} > {unfused_bytes}"
        tensors = [(fused[0], unfused[0])] + [(fused[1][k], unfused[1][k]) for k in fused[1]]
        for got, want in tensors:
            if backend == "torch":
                assert torch.equal(got, want)
            else:
                assert utils.rel_error(got, want) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_swin_with_fused_add_matches_reference(backend, deep):
    """Swin blocks run the fused add for the grid and the prompt rows: logits and prompt/head
    gradients within 1e-5 (relative) of the reference backend."""
    model = utils.prompted_swin(size="w4", num_prompts=3, deep=deep).train()
    x, y = random_batch(model, 2)
    vpt_fast.set_backend(model, backend)
    _assert_fused_and_matches_reference(model, backend, x, y)


def test_block_keeps_unfoldable_branches_unfused():
    """A trainable LayerScale (or an active drop path) is not folded into the kernel: autograd's own
    path runs it and gives its gradient."""
    model = _vit("layerscale_qknorm", deep=True)
    block = model.blocks[0]
    assert block_common.branch_scale(block.ls1, block.drop_path1) == (True, block.ls1.gamma)
    block.ls1.gamma.requires_grad_(True)
    assert block_common.branch_scale(block.ls1, block.drop_path1) == (False, None)
    x, y = random_batch(model, 2)
    F.cross_entropy(model(x), y).backward()
    assert block.ls1.gamma.grad is not None and block.ls1.gamma.grad.abs().sum() > 0


def test_add_layer_norm_bad_inputs(impl):
    residual = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="branch must have residual's shape"):
        impl.add_layer_norm_fwd(residual, residual[:2], None, None, None, 1e-5)
    with pytest.raises(TypeError, match="branch dtype"):
        impl.add_layer_norm_fwd(residual, residual.double(), None, None, None, 1e-5)
    with pytest.raises(ValueError, match="scale must have shape"):
        impl.add_layer_norm_fwd(residual, residual, torch.ones(7, device=DEVICE), None, None, 1e-5)
    s, y, mean, rstd = impl.add_layer_norm_fwd(residual, residual, None, None, None, 1e-5)
    with pytest.raises(ValueError, match="dy must have s's shape"):
        impl.add_layer_norm_bwd(None, residual[:2], s, None, mean, rstd, None, torch.float32)
    with pytest.raises(ValueError, match="rstd must be"):
        impl.add_layer_norm_bwd(residual, None, s, None, mean, rstd[:2], None, torch.float32)
    assert impl.add_layer_norm_bwd(None, None, s, None, mean, rstd, None, torch.float32) == (None, None)
    norm = torch.nn.LayerNorm(8).requires_grad_(False)
    with pytest.raises(ValueError, match="branch must have residual's shape"):
        add_layer_norm(residual.cpu(), residual.cpu()[:2], norm, "torch")
    with pytest.raises(TypeError, match="nn.LayerNorm"):
        add_layer_norm(residual.cpu(), residual.cpu(), torch.nn.Identity(), "torch")


@pytest.mark.slow
def test_add_layer_norm_torch_compile(impl):
    residual, branch, scale, w, b, ds, dy = _inputs((3, 5, 40), torch.float32, branch_dtype=torch.bfloat16,
                                                    scaled=True)

    def f(residual, branch, scale, w, b, ds, dy):
        s, y, mean, rstd = impl.add_layer_norm_fwd(residual, branch, scale, w, b, 1e-6, torch.bfloat16)
        return (s, y, *impl.add_layer_norm_bwd(ds, dy, s, w, mean, rstd, scale, torch.bfloat16))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor" if HAS_CUDA else "aot_eager", fullgraph=True)
    args = (residual, branch, scale, w, b, ds, dy)
    for name, got, want in zip(("s", "y", "d residual", "d branch"), compiled(*args), f(*args)):
        assert got.dtype == want.dtype
        assert_close(got.float(), want.float(), 1e-6, 1e-6, name)
