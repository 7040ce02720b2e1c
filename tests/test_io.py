"""Prompt checkpoints (docs/design.md §4): round trip, strictness, and configuration mismatch."""
from __future__ import annotations

import pytest
import torch

import vpt_fast
from utils import prompted_swin, tiny_vit
from utils import prompted_vit as prompted


def test_round_trip_restores_logits(tmp_path):
    model = prompted(seed=0, num_prompts=4, deep=True, project=16).eval()
    path = tmp_path / "prompts.safetensors"
    vpt_fast.save_prompts(model, path)
    fresh = prompted(seed=0, num_prompts=4, deep=True, project=16).eval()  # same backbone
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(1.0)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(fresh(x), model(x))
    vpt_fast.load_prompts(fresh, path)
    assert torch.equal(fresh(x), model(x))


def test_swin_round_trip_restores_logits(tmp_path):
    """Swin: every stage's prompts, the projections and the head survive save/load into a fresh
    prompted model of the same configuration."""
    config = dict(depths=(1, 1), num_heads=(1, 2), num_prompts=3, deep=True, project=6)
    model = prompted_swin(seed=0, **config).eval()
    path = tmp_path / "swin.safetensors"
    vpt_fast.save_prompts(model, path)
    assert {"prompts.0", "prompts.1", "proj.0.weight", "proj.1.weight"} <= set(vpt_fast.prompt_state_dict(model))
    fresh = prompted_swin(seed=0, **config).eval()  # same backbone
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(1.0)
    x = torch.randn(2, 3, 56, 56)
    assert not torch.allclose(fresh(x), model(x))
    vpt_fast.load_prompts(fresh, path)
    assert torch.equal(fresh(x), model(x))

def test_state_dict_layout():
    state = vpt_fast.prompt_state_dict(prompted(num_prompts=4, deep=True, project=16))
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "prompts": (3, 4, 16), "proj.weight": (48, 16), "proj.bias": (48,),
        "head.weight": (5, 48), "head.bias": (5,)}
    shallow = vpt_fast.prompt_state_dict(prompted(num_prompts=4, deep=False))
    assert tuple(shallow["prompts"].shape) == (1, 4, 48) and "proj.weight" not in shallow


@pytest.mark.parametrize("other", [dict(num_prompts=5, deep=True), dict(num_prompts=4, deep=False),
                                   dict(num_prompts=4, deep=True, project=8)])
def test_mismatched_checkpoint_raises_and_changes_nothing(tmp_path, other):
    path = tmp_path / "prompts.safetensors"
    vpt_fast.save_prompts(prompted(num_prompts=4, deep=True), path)
    model = prompted(seed=3, **other)
    before = vpt_fast.prompt_state_dict(model)
    with pytest.raises(ValueError, match="another configuration"):
        vpt_fast.load_prompts(model, path)
    after = vpt_fast.prompt_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_prompt_state_dict_is_strict():
    model = prompted(num_prompts=4)
    state = vpt_fast.prompt_state_dict(model)
    before = vpt_fast.prompt_state_dict(model)
    bad_shape = dict(state, prompts=torch.zeros(3, 5, 48))
    with pytest.raises(ValueError, match="shape"):
        vpt_fast.load_prompt_state_dict(model, bad_shape)
    with pytest.raises(ValueError, match="missing"):
        vpt_fast.load_prompt_state_dict(model, {k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(ValueError, match="unexpected"):
        vpt_fast.load_prompt_state_dict(model, dict(state, extra=torch.zeros(1)))
    after = vpt_fast.prompt_state_dict(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_not_a_prompt_checkpoint(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a vpt_fast prompt checkpoint"):
        vpt_fast.load_prompts(prompted(num_prompts=4), path)


@pytest.mark.parametrize("kwargs,field", [(dict(patch_size=16, img_size=64), "patch_size"),
                                          (dict(reg_tokens=2), "num_prefix_tokens")])
def test_checkpoint_from_another_backbone_of_the_same_width_is_refused(tmp_path, kwargs, field):
    """Prompts fit any backbone of their width and depth, but were trained on one: a file from another
    patch size or prefix layout is refused by load_prompts and PromptBank.add, naming the field."""
    path = tmp_path / "prompts.safetensors"
    vpt_fast.save_prompts(prompted(num_prompts=4, deep=True), path)
    model = vpt_fast.prompt(tiny_vit(**kwargs), num_prompts=4)
    with pytest.raises(ValueError, match=field):
        vpt_fast.load_prompts(model, path)
    with pytest.raises(ValueError, match=field):
        vpt_fast.PromptBank(model).add("task", path)


def test_checkpoint_without_the_newer_metadata_fields_still_loads(tmp_path):
    """Files written by the first format version (no architecture, patch, prefix, head, geometry or
    backbone records) load as before, onto any backbone of their configuration."""
    from safetensors.torch import save_file

    from vpt_fast.io import metadata
    source = prompted(num_prompts=4, deep=True)
    first_fields = ("format", "model_family", "embed_dim", "depth", "num_prompts", "deep", "project", "num_classes",
                    "vpt_fast_version")
    old = {k: v for k, v in metadata(source).items() if k in first_fields}
    save_file({k: t.contiguous() for k, t in vpt_fast.prompt_state_dict(source).items()},
              str(tmp_path / "old.safetensors"), metadata=old)
    model = prompted(seed=3, num_prompts=4, deep=True)
    vpt_fast.load_prompts(model, tmp_path / "old.safetensors")
    assert torch.equal(model.vpt.prompts, source.vpt.prompts)
