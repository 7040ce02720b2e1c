"""Prompts and heads are trained on one backbone (vpt_fast/backbone.py): prompt files and PromptBank
refuse another configuration, module structure, geometry or frozen weights, naming the difference, and
accept dtype copies of the same backbone (docs/design.md §4, §8)."""
from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import vpt_fast
from utils import random_batch, randomize, rel_error, tiny_swin, tiny_vit
from vpt_fast.io import metadata


def _on_weights_of(base: torch.nn.Module, other: torch.nn.Module) -> torch.nn.Module:
    """`other` with every backbone tensor that `base` also has (same name and shape) copied from
    `base`: what a user gets building another configuration from the same pretrained weights."""
    mine = base.state_dict()
    state = {k: v for k, v in other.state_dict().items()}
    state.update({k: v for k, v in mine.items() if k in state and state[k].shape == v.shape})
    other.load_state_dict(state)
    return other


def _prompted(model, **kwargs):
    return randomize(vpt_fast.prompt(model, num_prompts=3, **kwargs)).eval()


# -- 1. PromptBank.add(model): the whole configuration and backbone, both ways ------------------------

BANK_DIFFERENCES = {  # tiny_vit overrides -> what the refusal names
    "qk_norm": (dict(qk_norm=True), "q_norm"),
    "pre_norm": (dict(pre_norm=True), "norm_pre"),
    "global_pool": (dict(global_pool="avg"), "global_pool"),
    "fc_norm": (dict(global_pool="avg", fc_norm=True), "global_pool|fc_norm"),
    "layer_scale": (dict(init_values=1.0), "ls1"),
    "activation": (dict(act_layer="gelu_tanh"), "GELUTanh"),
    "norm_eps": (dict(norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5)), "eps"),
    "registers": (dict(reg_tokens=1), "num_prefix_tokens|reg_tokens"),
    "heads": (dict(num_heads=6), "num_heads"),
}


@pytest.mark.parametrize("difference", list(BANK_DIFFERENCES))
def test_bank_refuses_a_task_model_with_another_configuration(difference):
    """Every parameter the bank has also exists in the task with the same values, yet the task
    computes another function: refused, naming the difference (the old check accepted these, and the
    task's logits in the bank differed from its own model's by 0.6-1.5 relative)."""
    overrides, named = BANK_DIFFERENCES[difference]
    torch.manual_seed(0)
    base = tiny_vit()
    bank = vpt_fast.PromptBank(_prompted(copy.deepcopy(base)))
    task = _prompted(_on_weights_of(base, tiny_vit(**overrides)))
    with pytest.raises(ValueError, match=named):
        bank.add("task", task)
    assert bank.task_names == []


def test_bank_refuses_a_swin_task_of_another_image_size():
    """Same weights, same shapes; the windows of another image size are another function (the
    buffers and the geometry differ)."""
    torch.manual_seed(0)
    base = tiny_swin("w7")
    bank = vpt_fast.PromptBank(_prompted(copy.deepcopy(base)))
    other = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112, window_size=7,
                              embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=5)
    with pytest.raises(ValueError, match="img_size"):
        bank.add("task", _prompted(_on_weights_of(base, other)))


def test_bank_compares_buffers_and_accepts_dtype_copies_and_the_opt_out():
    torch.manual_seed(0)
    base = tiny_swin("w7")
    bank = vpt_fast.PromptBank(_prompted(copy.deepcopy(base)))
    task = _prompted(copy.deepcopy(base))
    with torch.no_grad():
        task.layers[0].blocks[1].attn_mask.mul_(0.5)  # a buffer, not a parameter
    with pytest.raises(ValueError, match="attn_mask holds other values"):
        bank.add("buffer", task)
    bank.add("forced", task, check_backbone=False)
    bank.add("in_float64", _prompted(copy.deepcopy(base)).double())
    assert bank.task_names == ["forced", "in_float64"]


def test_bank_opt_out_still_refuses_another_head_configuration():
    torch.manual_seed(0)
    base = tiny_vit()
    bank = vpt_fast.PromptBank(_prompted(copy.deepcopy(base)))
    with pytest.raises(ValueError, match="global_pool"):
        bank.add("avg", _prompted(_on_weights_of(base, tiny_vit(global_pool="avg"))), check_backbone=False)


def test_bank_task_equal_to_its_model_when_accepted():
    """The accepted case gives each task its own model's logits (what the refusals protect)."""
    torch.manual_seed(0)
    base = tiny_vit()
    bank = vpt_fast.PromptBank(_prompted(copy.deepcopy(base)))
    task = _prompted(copy.deepcopy(base))
    bank.add("task", task)
    x, _ = random_batch(task, 2)
    with torch.no_grad():
        assert rel_error(bank(x, ["task", "task"])["task"], task(x)) < 1e-5


# -- 2. prompt files record what the prompts and head mean ----------------------------------------


@pytest.mark.parametrize("check_backbone", [True, False])
def test_file_from_another_pool_is_refused_naming_the_field(tmp_path, check_backbone):
    """A file saved from an 'avg' model into a 'token' model of the same backbone: refused, with or
    without the backbone check (the head reads other features)."""
    torch.manual_seed(0)
    base = tiny_vit()
    source = _prompted(_on_weights_of(base, tiny_vit(global_pool="avg")))
    vpt_fast.save_prompts(source, tmp_path / "avg.safetensors")
    model = _prompted(copy.deepcopy(base))
    with pytest.raises(ValueError, match="global_pool: 'avg' in the file vs 'token' in the model"):
        vpt_fast.load_prompts(model, tmp_path / "avg.safetensors", check_backbone=check_backbone)
    with pytest.raises(ValueError, match="global_pool"):
        vpt_fast.PromptBank(model).add("avg", tmp_path / "avg.safetensors", check_backbone=check_backbone)


@pytest.mark.parametrize("overrides,field", [(dict(global_pool="avg", fc_norm=True), "fc_norm"),
                                             (dict(pre_norm=True), "norm_pre"),
                                             (dict(class_token=False, global_pool="avg"), "class_token")])
def test_file_without_architecture_name_is_compared_on_head_fields(tmp_path, overrides, field):
    """Models built from the class (no timm registry name) are still compared field by field."""
    tiny = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    source = _prompted(VisionTransformer(**tiny, **{"global_pool": "avg", **overrides}))
    assert metadata(source)["architecture"] == ""
    vpt_fast.save_prompts(source, tmp_path / "p.safetensors")
    model = _prompted(VisionTransformer(**tiny, global_pool="avg", fc_norm=False))
    with pytest.raises(ValueError, match=field):
        vpt_fast.load_prompts(model, tmp_path / "p.safetensors", check_backbone=False)


# -- 3. prompt files record the backbone's weights and geometry -----------------------------------


def test_file_from_other_weights_is_refused_and_the_opt_out_loads(tmp_path):
    """Another pretrained tag of the same architecture: refused by load_prompts and bank.add, naming
    a tensor; check_backbone=False loads it."""
    torch.manual_seed(0)
    source = _prompted(tiny_vit())
    vpt_fast.save_prompts(source, tmp_path / "p.safetensors")
    torch.manual_seed(1)
    model = _prompted(tiny_vit())
    before = vpt_fast.prompt_state_dict(model)
    with pytest.raises(ValueError, match="trained on another backbone: .* holds other values"):
        vpt_fast.load_prompts(model, tmp_path / "p.safetensors")
    assert all(torch.equal(before[k], v) for k, v in vpt_fast.prompt_state_dict(model).items())
    bank = vpt_fast.PromptBank(model)
    with pytest.raises(ValueError, match="trained on another backbone"):
        bank.add("file", tmp_path / "p.safetensors")
    state, meta = vpt_fast.io.read_prompt_file(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="trained on another backbone"):
        bank.add("state", state, metadata=meta)
    with pytest.warns(UserWarning, match="without metadata"):
        bank.add("unchecked", state)
    vpt_fast.load_prompts(model, tmp_path / "p.safetensors", check_backbone=False)
    assert torch.equal(model.vpt.prompts, source.vpt.prompts)


def test_weight_signature_tolerates_dtype_copies_only(tmp_path):
    """bf16 and fp16 copies of the backbone are the same weights; a 1% change of one LayerNorm
    weight is not."""
    torch.manual_seed(0)
    source = _prompted(tiny_vit())
    vpt_fast.save_prompts(source, tmp_path / "p.safetensors")
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        vpt_fast.load_prompts(copy.deepcopy(source).to(dtype), tmp_path / "p.safetensors")
    changed = copy.deepcopy(source)
    with torch.no_grad():
        changed.blocks[1].norm2.weight.mul_(1.01)
    with pytest.raises(ValueError, match="blocks.1.norm2.weight holds other values"):
        vpt_fast.load_prompts(changed, tmp_path / "p.safetensors")


def test_swin_file_from_another_window_is_refused(tmp_path):
    """Window 7 and window 4 Swin models of the same dims: refused, naming the window size."""
    source = _prompted(tiny_swin("w7", depths=(1, 1)))
    vpt_fast.save_prompts(source, tmp_path / "w7.safetensors")
    model = _prompted(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, window_size=4,
                                        embed_dim=32, depths=(1, 1), num_heads=(2, 4), num_classes=5))
    with pytest.raises(ValueError, match="window_size"):
        vpt_fast.load_prompts(model, tmp_path / "w7.safetensors")


def test_weight_signature_is_cached_and_follows_updates():
    model = _prompted(tiny_vit())
    first = vpt_fast.backbone.weights_signature(model)
    assert vpt_fast.backbone.weights_signature(model) is first
    with torch.no_grad():
        model.blocks[0].norm1.bias.add_(1.0)
    assert vpt_fast.backbone.weights_signature(model) != first


# -- 6. set_grad_checkpointing shows in the configuration ----------------------------------------


@pytest.mark.parametrize("factory", [tiny_vit, tiny_swin])
def test_grad_checkpointing_is_in_the_config(factory):
    model = vpt_fast.prompt(factory(), num_prompts=3, recompute="mlp")
    model.set_grad_checkpointing()
    assert model.vpt_config.recompute == "block" and model.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert model.vpt_config.recompute == "mlp" and not model.grad_checkpointing
    checkpointed = factory()
    checkpointed.set_grad_checkpointing()
    assert vpt_fast.prompt(checkpointed, num_prompts=3).vpt_config.recompute == "block"


# -- 9. unreadable prompt files are named ------------------------------------------------------


def test_unreadable_prompt_files_name_the_path(tmp_path):
    model = _prompted(tiny_vit())
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory"):
        vpt_fast.load_prompts(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        vpt_fast.load_prompts(model, tmp_path / "missing.safetensors")
    vpt_fast.save_prompts(model, tmp_path / "p.safetensors")
    data = (tmp_path / "p.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        vpt_fast.load_prompts(model, tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="cut.safetensors"):
        vpt_fast.PromptBank(model).add("cut", tmp_path / "cut.safetensors")


def test_bank_task_names_that_a_module_dict_cannot_hold_are_refused_clearly():
    """'cifar.100' or 'double' raised KeyError from nn.ModuleDict, naming neither the rule nor the task."""
    bank = vpt_fast.PromptBank(_prompted(tiny_vit()))
    for name in ("cifar.100", "double", "train"):
        with pytest.raises(ValueError, match=f"without '.' that is not an attribute.*got {name!r}"):
            bank.add(name, bank.model)
    bank.add("cifar-100", bank.model)
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add("cifar-100", bank.model)
