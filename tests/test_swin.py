"""Prompted timm SwinTransformer (docs/design.md §1 "Swin", §2, §5): every prompt-aware backend against
the release-style `reference` backend (logits and gradients of prompts, projections and head, on
fresh random inputs and random, not initial, prompts), the reference against a literal
transcription of the released per-window code at batch 1, per-sample independence, exact FLOPs."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import utils
import vpt_fast
from utils import SWIN_SIZES, prompted_swin, random_batch, randomize, rel_error, released_swin_logits, tiny_swin
from vpt_fast import set_backend
from vpt_fast.bench import flop_mapping
from vpt_fast.blocks.swin import SwinBlock, SwinPatchMerging
from vpt_fast.config import PromptConfig
from vpt_fast.models.swin import prompt_swin

TOL = 1e-4  # fp32 on CPU, docs/design.md §5
FAST_BACKENDS = [b for b in vpt_fast.available_backends() if b in ("torch", "cuda")]
KERNEL_BACKENDS = [b for b in vpt_fast.available_backends() if b in ("triton", "cuda")]

def assert_matches_reference(model, backends=FAST_BACKENDS, batch: int = 3):
    utils.assert_matches_reference(model, backends, *random_batch(model, batch), tol=TOL)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("size", list(SWIN_SIZES))
def test_matches_reference(size, deep):
    assert_matches_reference(prompted_swin(size=size, deep=deep).train())


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="no triton/cuda backend on this machine")
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_kernel_backends_match_reference(deep):
    model = prompted_swin(size="w4", num_prompts=3, deep=deep).train()  # head dim 16
    assert_matches_reference(model.to("cuda" if torch.cuda.is_available() else "cpu"), KERNEL_BACKENDS, batch=2)


OPTIONS = [  # (num_prompts, deep, project, train, dropout, recompute, depths)
    (1, True, None, True, 0.0, "none", (2, 2)),
    (3, False, None, False, 0.0, "none", (2, 2)),
    (4, True, None, True, 0.3, "none", (2, 2)),
    (4, False, None, True, 0.3, "none", (2, 2)),
    (4, True, 6, True, 0.0, "mlp", (2, 2)),
    (4, False, 6, True, 0.0, "block", (2, 2)),
    (4, True, None, True, 0.2, "block", (1, 2, 1)),
    (4, False, None, False, 0.0, "mlp", (1, 2, 1)),
]


@pytest.mark.parametrize("num_prompts,deep,project,train,dropout,recompute,depths", OPTIONS)
def test_options_match_reference(num_prompts, deep, project, train, dropout, recompute, depths):
    heads = (2,) * (len(depths) - 1) + (4,)
    model = prompted_swin(num_prompts=num_prompts, deep=deep, project=project, dropout=dropout,
                          recompute=recompute, depths=depths, num_heads=heads, size="w7_padded")
    model.train(train)
    assert model.vpt.training == train and not model.layers.training
    assert_matches_reference(model)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_samples_are_independent(backend, deep):
    """A sample's logits do not change when the other sample of its batch changes."""
    model = prompted_swin(deep=deep).eval()
    set_backend(model, backend)
    x, _ = random_batch(model, batch=2)
    x2 = x.clone()
    x2[1] = torch.randn_like(x2[1])
    with torch.no_grad():
        a, b, alone = model(x), model(x2), model(x[:1])
    assert rel_error(a[0], b[0]) < TOL and rel_error(a[0], alone[0]) < TOL
    assert rel_error(a[1], b[1]) > 1e-3


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("size", ["w7", "w12"])
def test_batch1_equals_released_code(size, deep):
    torch.manual_seed(0)
    timm_model = tiny_swin(size).eval()
    model = randomize(prompt_swin(copy.deepcopy(timm_model), PromptConfig(num_prompts=5, deep=deep))).eval()
    timm_model.head.fc.load_state_dict(model.head.fc.state_dict())
    sets = [p.detach() for p in model.vpt.prompts]
    x, _ = random_batch(model, batch=2)
    x2 = x.clone()
    x2[1] = torch.randn_like(x2[1])
    with torch.no_grad():
        released = released_swin_logits(timm_model, sets, deep, x[:1])
        for backend in ["reference"] + FAST_BACKENDS:
            set_backend(model, backend)
            assert rel_error(model(x[:1]), released) < TOL, backend
        # The released code's batch-order bug (docs/design.md §1): at batch 2 sample 0 depends on sample 1
        # (shallow; deep prompts are the same for every sample, and their mixed-up window means are
        # thrown away except in the last block, which has one window here).
        a, b = released_swin_logits(timm_model, sets, deep, x), released_swin_logits(timm_model, sets, deep, x2)
    err = rel_error(a[0], b[0])
    assert (err < TOL) if deep else (err > 1e-4), err


# -- drop-in behaviour, parameters, errors ---------------------------------------------------

@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_no_prompts_is_timm(backend):
    torch.manual_seed(0)
    timm_model = tiny_swin("w7_padded").eval()
    x = torch.randn(2, 10, 10, 32)
    for block in [timm_model.layers[0].blocks[0], timm_model.layers[0].blocks[1]]:
        ours = SwinBlock.from_timm(copy.deepcopy(block), backend=backend)
        with torch.no_grad():
            assert rel_error(ours(x), block(x)) < TOL
    merging = timm_model.layers[1].downsample
    ours = SwinPatchMerging.from_timm(copy.deepcopy(merging), backend=backend)
    with torch.no_grad():
        assert rel_error(ours(x), merging(x)) < TOL


def test_parameters_and_state():
    torch.manual_seed(0)
    timm_model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=7)
    keys = set(timm_model.state_dict())
    model = prompt_swin(timm_model, PromptConfig(num_prompts=50, deep=True))
    shapes = {n: tuple(t.shape) for n, t in model.vpt.state_tensors().items()}
    assert shapes == {"prompts.0": (2, 50, 96), "prompts.1": (2, 50, 192), "prompts.2": (6, 50, 384),
                      "prompts.3": (2, 50, 768)}
    assert {k for k in model.state_dict() if not k.startswith("vpt.")} == keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"vpt.prompts.{s}" for s in range(4)} | {"head.fc.weight", "head.fc.bias"}
    bound = (6 / (3 * 16 + 96)) ** 0.5
    assert all(0 < p.abs().max() <= bound for p in model.vpt.prompts)
    model.train()
    assert model.training and model.vpt.training and model.head.training and not model.layers[0].blocks[0].training

    shallow = prompt_swin(tiny_swin(), PromptConfig(num_prompts=3, deep=False, project=4))
    shapes = {n: tuple(t.shape) for n, t in shallow.vpt.state_tensors().items()}
    assert shapes == {"prompts.0": (1, 3, 4), "proj.0.weight": (32, 4), "proj.0.bias": (32,)}


def test_bad_inputs():
    with pytest.raises(TypeError, match="SwinTransformer"):
        prompt_swin(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32), PromptConfig())
    with pytest.raises(TypeError, match="global_pool='avg'"):
        prompt_swin(tiny_swin(global_pool="max"), PromptConfig())
    with pytest.raises(ValueError, match="num_prompts"):
        prompt_swin(tiny_swin(), PromptConfig(num_prompts=0))
    model = prompt_swin(tiny_swin(), PromptConfig(num_prompts=2))
    with pytest.raises(ValueError, match="already prompted"):
        prompt_swin(model, PromptConfig())
    with pytest.raises(ValueError, match="image size"):
        model(torch.randn(1, 3, 64, 64))
    block = model.layers[0].blocks[0]
    with pytest.raises(ValueError, match="prompts must be"):
        block(torch.randn(2, 14, 14, 32), torch.randn(3, 2, 32))
    with pytest.raises(ValueError, match="expected x"):
        block(torch.randn(2, 196, 32))
    with pytest.raises(TypeError, match="SwinTransformerBlock"):
        SwinBlock.from_timm(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="PatchMerging"):
        SwinPatchMerging.from_timm(torch.nn.Identity())


def test_backbone_frozen_and_in_eval_mode():
    torch.manual_seed(0)
    model = prompt_swin(tiny_swin(drop_rate=0.5, drop_path_rate=0.5, attn_drop_rate=0.5, proj_drop_rate=0.5),
                        PromptConfig(num_prompts=3, project=8, dropout=0.2))
    model.train()
    # the model itself and its head (with timm's head dropout) follow train(); the backbone does not
    assert [n for n, m in model.named_modules() if m.training and not n.startswith("vpt")
            and n.split(".")[0] != "head"] == [""]
    assert all(m.training for m in model.head.modules())
    set_backend(model, "torch")
    model.vpt.dropout.p = 0.0  # backbone dropout/drop-path must be off even under train()
    x, y = random_batch(model, batch=2)
    assert torch.equal(model.forward_tokens(x), model.forward_tokens(x))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=1e-3)
    before = [p.detach().clone() for p in trainable]
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(p, frozen[n]), n


@pytest.mark.gpu
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gpu_matches_reference(backend, deep):
    """fp32: rel. error < 1e-4; bf16 autocast: FlashAttention's rule against the fp32 reference,
    at most 2x (+ one bf16 ulp) the error of eager release-style VPT in bf16, logits and every gradient."""
    if backend not in vpt_fast.available_backends():
        pytest.skip(f"backend {backend} not available")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10,
                              depths=(2, 2, 2, 2))
    model = randomize(prompt_swin(model, PromptConfig(num_prompts=50, deep=deep))).cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    utils.assert_follows_reference_in_low_precision(model.train(), backend, x, y, "cuda")


# -- exact FLOPs (docs/design.md §2) ----------------------------------------------------------------

def train_step_flops(model, backend: str, x, y) -> int:
    set_backend(model, backend)
    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


@pytest.mark.slow  # Swin-T at 224px, two training steps under FlopCounterMode
def test_flops_swin_t_deep():
    """Swin-T 224px, 50 deep prompts, batch 2: a training step of the prompt-aware path needs at
    most 0.70x the FLOPs of the eager release-style reference (measured: 41.6 vs 60.4 GFLOP, 0.688)."""
    torch.manual_seed(0)
    model = prompt_swin(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10),
                        PromptConfig(num_prompts=50, deep=True)).train()
    x, y = random_batch(model, batch=2)
    reference = train_step_flops(model, "reference", x, y)
    fast = train_step_flops(model, "torch", x, y)
    assert fast <= 0.70 * reference, f"torch {fast / 1e9:.2f} GFLOP vs reference {reference / 1e9:.2f} GFLOP"
