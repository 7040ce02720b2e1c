"""Prompted timm ViT models: every backend against the release-style `reference` backend
(docs/design.md §1, §5): logits and the gradients of prompts, projection and head, on fresh random inputs
and random (not initial) prompts."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ResPostBlock

import utils
import vpt_fast
from utils import VIT_VARIANTS, prompted_vit, random_batch, rel_error, released_vit_logits, tiny_vit

TOL = 1e-4  # fp32 on CPU, docs/design.md §5
FAST_BACKENDS = [b for b in vpt_fast.available_backends() if b in ("torch", "cuda")]
KERNEL_BACKENDS = [b for b in vpt_fast.available_backends() if b in ("triton", "cuda")]

def assert_matches_reference(model, backends, batch: int = 3):
    utils.assert_matches_reference(model, backends, *random_batch(model, batch), tol=TOL)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("variant", list(VIT_VARIANTS))
def test_variants_match_reference(variant, deep):
    model = prompted_vit(variant=variant, num_prompts=7, deep=deep).train()
    assert_matches_reference(model, FAST_BACKENDS)


OPTIONS = [  # (num_prompts, deep, project, train, dropout, recompute)
    (1, True, None, True, 0.0, "none"),
    (1, False, None, False, 0.0, "none"),
    (50, True, None, True, 0.0, "none"),
    (50, False, 16, True, 0.0, "none"),
    (7, True, 16, True, 0.0, "mlp"),
    (7, True, None, True, 0.0, "block"),
    (7, False, None, True, 0.0, "block"),
    (7, True, None, True, 0.3, "none"),
    (7, False, 16, True, 0.3, "mlp"),
    (7, True, 16, False, 0.3, "none"),
]


@pytest.mark.parametrize("num_prompts,deep,project,train,dropout,recompute", OPTIONS)
def test_options_match_reference(num_prompts, deep, project, train, dropout, recompute):
    model = prompted_vit(num_prompts=num_prompts, deep=deep, project=project, dropout=dropout,
                         recompute=recompute).train(train)
    assert_matches_reference(model, FAST_BACKENDS)


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="no triton/cuda backend on this machine")
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_kernel_backends_match_reference(deep):
    # Small enough for the Triton interpreter; head dim 16.
    torch.manual_seed(0)
    model = vpt_fast.prompt(tiny_vit(img_size=16, embed_dim=32, depth=2, num_heads=2), num_prompts=3, deep=deep)
    with torch.no_grad():
        model.vpt.prompts.normal_(0, 0.5)
    assert_matches_reference(model.train(), KERNEL_BACKENDS, batch=2)


def test_prompt_dropout_masks_are_per_sample():
    model = prompted_vit(num_prompts=7, deep=True, dropout=0.5).train()
    x = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1)
    torch.manual_seed(0)
    logits = model(x)
    assert (logits[0] - logits[1]).abs().max() > 1e-4  # same image, different masks
    model.eval()
    logits = model(x)
    assert torch.allclose(logits[0], logits[1], atol=1e-6)


def test_backbone_frozen_and_in_eval_mode():
    model = vpt_fast.prompt(tiny_vit(drop_rate=0.5, drop_path_rate=0.5, attn_drop_rate=0.5,
                                     proj_drop_rate=0.5), num_prompts=5, project=16, dropout=0.2)
    model.train()
    assert model.vpt.training and model.vpt.dropout.training
    # the model itself and its head (with timm's head dropout) follow train(); the backbone does not
    others = [name for name, m in model.named_modules() if m.training and not name.startswith("vpt")]
    assert others == ["", "fc_norm", "head_drop", "head"]
    vpt_fast.set_backend(model, "torch")
    model.vpt.dropout.p = 0.0  # backbone dropout/drop-path must be off even under train()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.forward_features(x), model.forward_features(x))
    assert not torch.equal(model(x), model(x))  # the head's dropout (train.py --drop) runs
    model.eval()
    assert not model.vpt.training and not model.head_drop.training

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vpt.prompts", "vpt.proj.weight", "vpt.proj.bias", "head.weight", "head.bias"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=1e-3)
    model.train()
    for _ in range(2):
        F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
            assert torch.equal(p, frozen[n]), n


@pytest.mark.slow  # two ViT-B/16
@pytest.mark.parametrize("deep,expected", [(False, 38_400), (True, 460_800)])
def test_paper_parameter_counts(deep, expected):
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    vpt_fast.prompt(model, num_prompts=50, deep=deep)
    assert model.vpt.prompts.numel() == expected
    trainable, total = vpt_fast.trainable_parameters(model)
    assert trainable == expected + 768 * 100 + 100
    assert total == 85_875_556 + expected  # timm ViT-B/16 with a 100-class head, plus prompts


def test_state_dict_keys_of_backbone_unchanged():
    model = tiny_vit()
    keys = set(model.state_dict())
    vpt_fast.prompt(model, num_prompts=3)
    assert set(model.state_dict()) - keys == {"vpt.prompts"}


def test_vit_block_from_timm_matches_timm_block():
    torch.manual_seed(0)
    block = tiny_vit().blocks[0]
    x, prompts = torch.randn(2, 17, 48), torch.randn(1, 5, 48)
    expected = torch.cat([x[:, :1], prompts.expand(2, -1, -1), x[:, 1:]], 1)
    expected = block(expected)
    vblock = vpt_fast.ViTBlock.from_timm(block, backend="torch")
    out = vblock(x, prompts)
    assert rel_error(out, torch.cat([expected[:, :1], expected[:, 6:]], 1)) < TOL
    assert rel_error(vblock(x), block(x)) < TOL  # no prompts: timm's block
    per_sample = vblock(x, prompts.expand(2, -1, -1))
    assert rel_error(per_sample, out) < TOL


def test_bad_inputs_raise_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="num_prompts"):
        vpt_fast.prompt(tiny_vit(), num_prompts=0)
    with pytest.raises(ValueError, match="dropout"):
        vpt_fast.prompt(tiny_vit(), num_prompts=2, dropout=1.5)
    with pytest.raises(ValueError, match="backend"):
        vpt_fast.prompt(tiny_vit(), num_prompts=2, backend="fastest")
    with pytest.raises(ValueError, match="recompute"):
        vpt_fast.prompt(tiny_vit(), num_prompts=2, recompute="all")
    model = vpt_fast.prompt(tiny_vit(), num_prompts=2)
    with pytest.raises(ValueError, match="already prompted"):
        vpt_fast.prompt(model, num_prompts=2)
    with pytest.raises(TypeError, match="ResNet"):
        vpt_fast.prompt(timm.create_model("resnet10t", pretrained=False), num_prompts=2)
    with pytest.raises(TypeError, match="ResPostBlock"):
        vpt_fast.prompt(tiny_vit(block_fn=ResPostBlock), num_prompts=2)
    with pytest.raises(TypeError, match="DiffAttention"):
        vpt_fast.prompt(tiny_vit(attn_layer="diff"), num_prompts=2)
    with pytest.raises(Exception, match="match model"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="not prompted"):
        vpt_fast.set_backend(tiny_vit(), "torch")
    from vpt_fast import backends  # an unusable backend, also where the extension is built
    monkeypatch.setitem(backends._LOADED, "cuda", None)
    monkeypatch.setitem(backends._REASONS, "cuda", "extension not built (test)")
    with pytest.raises(RuntimeError, match="not available on this machine: extension not built"):
        vpt_fast.set_backend(model, "cuda")
    block = vpt_fast.ViTBlock.from_timm(tiny_vit().blocks[0], backend="torch")
    with pytest.raises(ValueError, match="prompts must be"):
        block(torch.randn(2, 17, 48), torch.randn(3, 5, 48))


@pytest.mark.gpu
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gpu_matches_reference(backend, deep):
    """fp32: rel. error < 1e-4; bf16 autocast: FlashAttention's rule — error vs the fp32 reference at
    most 2x (+ one bf16 ulp) the error of eager release-style VPT in bf16, logits and every gradient."""
    if backend not in vpt_fast.available_backends():
        pytest.skip(f"backend {backend} not available")
    torch.manual_seed(0)
    model = vpt_fast.prompt(tiny_vit(img_size=224, patch_size=16, embed_dim=384, depth=4, num_heads=6,
                                     num_classes=10), num_prompts=50, deep=deep).cuda()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    utils.assert_follows_reference_in_low_precision(model.train(), backend, x, y, "cuda")


@pytest.mark.slow  # dynamo traces the whole model twice
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_torch_compile_traces_without_graph_breaks(deep):
    model = prompted_vit(num_prompts=3, deep=deep, backend="torch").train()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # dynamo tracing, no codegen
    logits = compiled(x)
    logits.sum().backward()
    assert rel_error(logits, model(x)) < TOL
    assert model.vpt.prompts.grad is not None


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("variant", ["cls_token", "layerscale_qknorm"])
def test_bf16_autocast_follows_flash_rule(variant, deep):
    """Under bf16 autocast (CPU here; the GPU test repeats it on CUDA) every backend's error against
    the fp32 reference is at most 2x that of eager release-style VPT in bf16."""
    model = prompted_vit(variant=variant, num_prompts=7, deep=deep).train()
    x, y = random_batch(model, 3)
    for backend in FAST_BACKENDS + KERNEL_BACKENDS:
        utils.assert_follows_reference_in_low_precision(model, backend, x, y, "cpu", fp32_tol=None)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_meta_device_forward_backward(backend):
    """A prompted model runs on the meta device (shape checks, FLOP counting without memory), also
    inside an autocast region of another device."""
    model = prompted_vit(num_prompts=4, deep=True, backend=backend).to("meta").train()
    x = torch.empty(2, 3, 32, 32, device="meta")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (2, 5) and logits.device.type == "meta"
    logits.sum().backward()
    assert model.vpt.prompts.grad.shape == model.vpt.prompts.shape


def test_recompute_is_bitwise_identical_under_autocast():
    """recompute="mlp"/"block" rerun the same kernels in the same dtypes under bf16 autocast (the
    LayerNorms feeding GEMMs write bf16): loss and prompt gradients are bit-identical."""
    results = {}
    for recompute in ("none", "mlp", "block"):
        model = prompted_vit(num_prompts=4, deep=True, backend="torch", recompute=recompute).train()
        x, y = random_batch(model, batch=2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        results[recompute] = (loss.detach(), model.vpt.prompts.grad)
    for recompute in ("mlp", "block"):
        assert torch.equal(results[recompute][0], results["none"][0])
        assert torch.equal(results[recompute][1], results["none"][1])


@pytest.mark.parametrize("project", [None, 8], ids=["no_proj", "proj8"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("options", [{}, {"reg_tokens": 2},
                                     {"class_token": False, "reg_tokens": 3, "global_pool": "avg"},
                                     {"global_pool": "avg", "fc_norm": True}, {"no_embed_class": True},
                                     {"global_pool": ""}],
                         ids=["cls", "registers", "avg_no_cls", "avg_fc_norm", "no_embed_class", "no_pool"])
def test_every_backend_equals_the_released_code(options, deep, project):
    """Not only the backends against `reference`, which shares `_prompted_tokens` with them: all of them
    against a separate transcription of the released code running timm's unmodified model."""
    import copy
    torch.manual_seed(0)
    backbone = tiny_vit(**options).eval()
    model = utils.randomize(vpt_fast.prompt(copy.deepcopy(backbone), num_prompts=4, deep=deep, project=project)).eval()
    backbone.head.load_state_dict(model.head.state_dict())
    x, _ = random_batch(model, 2)
    with torch.no_grad():
        expected = released_vit_logits(backbone, model.vpt.prompts, model.vpt.proj, deep, x)
        for backend in ["reference", *FAST_BACKENDS]:
            vpt_fast.set_backend(model, backend)
            assert rel_error(model(x), expected) < 1e-5, backend
