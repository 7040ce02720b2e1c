"""`vpt_fast.cast_frozen` (issue 25 item 1): frozen GEMM weights stored in bf16 give, under bf16
autocast, the logits, loss and prompt/head gradients of the float32-weight model, bitwise, on every
backend: autocast casts those weights to bf16 before every GEMM anyway, and the GEMMs (F.linear /
F.conv2d, dX = dY·W in `weight.to(dy.dtype)`) then run the same kernels on the same operands.

Also: which tensors are cast (exact names for a tiny ViT; Eva's q/k/v biases; Swin's merging
reduction), what is refused (unprompted model, dtype, unfrozen weights, a second cast to another
dtype), the error of a forward outside autocast, prompt files after the cast and the prompt K/V cache.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import vpt_fast
from utils import prompted_swin, prompted_vit, random_batch, randomize
from vpt_fast.precision import castable_frozen

BF16 = torch.bfloat16
BACKENDS = [b for b in vpt_fast.available_backends() if b in ("reference", "torch", "cuda")]
TRITON = [b for b in vpt_fast.available_backends() if b == "triton"]  # CPU interpreter: a few tiny cases


def _eva(name: str, qkv_bias: bool, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=5, qkv_bias=qkv_bias, **kwargs)
    with torch.no_grad():  # timm zero-initialises q_bias / v_bias: give them values to round
        for p in model.parameters():
            if p.dim() == 1 and p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model


def _eva02(**kwargs):
    return _eva("eva02_tiny_patch14_224", True, ref_feat_shape=(4, 4), **kwargs)


MODELS = {
    "vit_deep_token": lambda **kw: prompted_vit(num_prompts=4, deep=True, **kw),
    "vit_shallow_token": lambda **kw: prompted_vit(num_prompts=4, deep=False, **kw),
    "vit_deep_avg": lambda **kw: prompted_vit(variant="registers_avg", num_prompts=4, deep=True, **kw),
    "vit_shallow_avg": lambda **kw: prompted_vit(variant="avg_pool", num_prompts=4, deep=False, **kw),
    "swin_deep": lambda **kw: prompted_swin(size="w4", deep=True, **kw),
    "swin_shallow": lambda **kw: prompted_swin(size="w4", deep=False, **kw),
    # the DINOv3 of the issue (rope 'dinov3', registers, LayerScale, no qkv bias)
    "dinov3": lambda **kw: randomize(vpt_fast.prompt(_eva("vit_small_patch16_dinov3", False), num_prompts=4, **kw)),
    # EVA-02 style: fused qkv with q_bias / k_bias (buffer) / v_bias, rope "cat", GluMlp (one packed fc1);
    # with scale_mlp: SwiGLU (fc1_g, fc1_x) with a hidden LayerNorm
    "eva02_glu": lambda **kw: randomize(vpt_fast.prompt(_eva02(), num_prompts=4, **kw)),
    "eva02_swiglu": lambda **kw: randomize(vpt_fast.prompt(_eva02(scale_mlp=True), num_prompts=4, **kw)),
}


def _train(model, backend: str, x, y):
    """Logits, loss and every trainable gradient of one bf16-autocast training step on `backend`."""
    vpt_fast.set_backend(model.train(), backend)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    return [logits.detach(), loss.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]


def _pair(name: str, **kwargs):
    model = MODELS[name](**kwargs)
    cast = vpt_fast.cast_frozen(copy.deepcopy(model), BF16)
    return model, cast, *random_batch(model, batch=2)


def _assert_equal(model, cast, backend, x, y):
    expected, got = _train(model, backend, x, y), _train(cast, backend, x, y)
    assert len(got) == len(expected) > 3
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and torch.equal(g, e), f"{backend}: output {i} differs by {(g - e).abs().max()}"


@pytest.mark.parametrize("name", list(MODELS))
def test_training_is_bitwise_unchanged(name):
    model, cast, x, y = _pair(name)
    for backend in BACKENDS:
        _assert_equal(model, cast, backend, x, y)


@pytest.mark.parametrize("recompute", ["mlp", "block"])
@pytest.mark.parametrize("name", ["vit_deep_token", "swin_deep", "eva02_swiglu"])
def test_recompute_is_bitwise_unchanged(name, recompute):
    model, cast, x, y = _pair(name, recompute=recompute)
    for backend in ("reference", "torch"):
        _assert_equal(model, cast, backend, x, y)


@pytest.mark.parametrize("name", ["vit_deep_token", "dinov3"])
def test_triton_is_bitwise_unchanged(name):
    if not TRITON:
        pytest.skip("triton not available")
    model, cast, x, y = _pair(name)
    _assert_equal(model, cast, "triton", x, y)


@pytest.mark.parametrize("name", ["vit_deep_token", "vit_shallow_token", "swin_deep", "eva02_swiglu"])
def test_inference_is_bitwise_unchanged(name):
    """no_grad twice: the second pass reads the prompt K/V cache (torch backend), and the fused
    inference tail (`add_norm_mlp_residual`) runs."""
    model, cast, x, _ = _pair(name)
    for backend in BACKENDS:
        outs = []
        for m in (model, cast):
            vpt_fast.set_backend(m.eval(), backend)
            with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
                outs.append([m(x) for _ in range(2)])
        for got, expected in zip(*outs[::-1]):
            assert torch.equal(got, expected), backend


def test_which_tensors_are_cast_vit():
    model = vpt_fast.cast_frozen(prompted_vit(num_prompts=4, deep=True), BF16)
    gemm = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    expected = ["patch_embed.proj.weight", "patch_embed.proj.bias"] + [
        f"blocks.{i}.{layer}.{t}" for i in range(3) for layer in gemm for t in ("weight", "bias")]
    cast = [name for name, t in model.state_dict().items() if t.dtype == BF16]
    assert sorted(cast) == sorted(expected)
    kept = {name for name, t in model.state_dict().items() if t.dtype == torch.float32}
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.norm1.weight", "vpt.prompts", "head.weight",
            "head.bias"} <= kept
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in expected)


def test_which_tensors_are_cast_eva_and_swin():
    eva = MODELS["eva02_swiglu"]()
    names = set(castable_frozen(eva))
    assert {"blocks.0.attn.q_bias", "blocks.0.attn.k_bias", "blocks.0.attn.v_bias", "blocks.0.attn.qkv.weight",
            "blocks.1.mlp.fc1_g.weight", "blocks.1.mlp.fc1_x.bias", "blocks.1.mlp.fc2.weight"} <= names
    assert not any(k in n for n in names for k in ("norm", "rope", "gamma", "cls_token", "reg_token", "pos_embed"))
    swin = MODELS["swin_deep"]()
    names = set(castable_frozen(swin))
    assert {"patch_embed.proj.weight", "layers.1.downsample.reduction.weight", "layers.0.blocks.1.attn.qkv.bias",
            "layers.1.blocks.0.mlp.fc2.weight"} <= names
    assert not any("relative_position" in n or "norm" in n or n.startswith(("head", "vpt")) for n in names)
    dino = MODELS["dinov3"]()
    assert not any("bias" in n and "attn.qkv" in n for n in castable_frozen(dino))  # qkv_bias=False
    siglip = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, patch_size=8,
                               embed_dim=32, depth=1, num_heads=2, num_classes=5)
    names = set(castable_frozen(vpt_fast.prompt(siglip, num_prompts=2)))
    assert {"attn_pool.q.weight", "attn_pool.kv.weight", "attn_pool.proj.weight", "attn_pool.mlp.fc1.weight"} <= names
    assert "attn_pool.latent" not in names and "attn_pool.norm.weight" not in names


def test_refusals():
    with pytest.raises(ValueError, match="not prompted"):
        vpt_fast.cast_frozen(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32), BF16)
    model = prompted_vit(num_prompts=2)
    for dtype in (torch.float32, torch.float64, torch.int8):
        with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
            vpt_fast.cast_frozen(model, dtype)
    model.blocks[1].mlp.fc1.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight require"):
        vpt_fast.cast_frozen(model, BF16)
    assert all(t.dtype == torch.float32 for t in model.state_dict().values()), "a refusal changes nothing"
    model.blocks[1].mlp.fc1.weight.requires_grad_(False)
    vpt_fast.cast_frozen(model, BF16)
    vpt_fast.cast_frozen(model, BF16)  # again: nothing to do
    with pytest.raises(ValueError, match="already stored in torch.bfloat16"):
        vpt_fast.cast_frozen(model, torch.float16)


@pytest.mark.parametrize("name", ["vit_deep_token", "swin_shallow", "dinov3"])
def test_forward_outside_autocast_raises(name):
    _, cast, x, _ = _pair(name)
    for context in (torch.no_grad(), torch.enable_grad()):
        with context, pytest.raises(RuntimeError, match=r"cast_frozen .*torch\.autocast\('cpu', "
                                                       r"dtype=torch\.bfloat16\) \(called without autocast"):
            cast(x)
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError, match="under autocast to "
                                                                                           "torch.float16"):
        cast(x)
    with pytest.raises(RuntimeError, match="cast_frozen"):
        cast.forward_features(x)
    cast.float()  # stored in float32 again: runs anywhere
    assert cast(x).dtype == torch.float32


def test_prompt_files_after_cast(tmp_path):
    model, cast, x, _ = _pair("vit_deep_token")
    vpt_fast.save_prompts(model, tmp_path / "fp32.safetensors")
    vpt_fast.save_prompts(cast, tmp_path / "bf16.safetensors")
    fresh = vpt_fast.cast_frozen(copy.deepcopy(model), BF16)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()
    vpt_fast.load_prompts(fresh, tmp_path / "fp32.safetensors")  # backbone check: a dtype copy passes
    other = copy.deepcopy(model)
    vpt_fast.load_prompts(other, tmp_path / "bf16.safetensors")
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        assert torch.equal(fresh(x), cast(x))
        assert torch.equal(other(x), model(x))
    other_backbone = vpt_fast.cast_frozen(prompted_vit(seed=5, num_prompts=4, deep=True), BF16)
    with pytest.raises(ValueError, match="holds other values"):
        vpt_fast.load_prompts(other_backbone, tmp_path / "fp32.safetensors")


def test_prompt_cache_after_cast():
    """A cast drops the prompt K/V cache, and its key would miss anyway (new storage and dtype)."""
    from vpt_fast.ops import parameters_of
    from vpt_fast.prompt_cache import parameter_key
    model, _, x, _ = _pair("vit_deep_token")
    vpt_fast.set_backend(model.eval(), "torch")
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        before = model(x)
    assert len(model.vpt.kv_cache) == len(model.blocks)
    block = model.blocks[0]
    key = parameter_key(parameters_of(block.norm1, block.attn))
    vpt_fast.cast_frozen(model, BF16)
    assert model.vpt.kv_cache == {}
    assert parameter_key(parameters_of(block.norm1, block.attn)) != key
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        assert torch.equal(model(x), before)
        assert torch.equal(model(x), before)  # from the rebuilt cache
