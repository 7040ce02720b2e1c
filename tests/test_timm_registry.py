"""`vpt_fast.register_timm()`: `vpt_<name>` timm entries for every timm ViT and Swin that prompt()
accepts (docs/design.md §4), with prompt() keywords as model kwargs and the base model's pretrained
configurations; and the `examples/timm_train.py` launcher that runs a train.py with those names
registered."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg

import vpt_fast
from vpt_fast import timm_models
from vpt_fast.models.common import PromptedModel
from vpt_fast.timm_models import BASE_MODULES, prompt_accepts

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
TINY_SWIN = dict(img_size=56, window_size=7, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=5,
                 drop_path_rate=0.0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_vit_and_swin_that_prompt_accepts_is_registered_once():
    vpt_fast.register_timm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is registered over
        assert vpt_fast.register_timm() == []
    bases = timm.list_models(module=list(BASE_MODULES))
    assert len(bases) > 100 and "vit_base_patch16_224" in bases and "swin_base_patch4_window7_224" in bases
    assert "deit_small_patch16_224" in bases and "vit_small_r26_s32_224" in bases  # DeiT and hybrid ViTs
    accepted = [name for name in bases if prompt_accepts(name)]
    assert set(timm.list_models("vpt_*")) == {f"vpt_{name}" for name in accepted}
    assert set(timm.list_models("vpt_*", pretrained=True)) == {
        f"vpt_{name}" for name in timm.list_models(module=list(BASE_MODULES), pretrained=True)
        if name.split(".")[0] in accepted}
    for name in ("vit_base_patch16_224", "deit_small_patch16_224", "vit_small_r26_s32_224",
                 "vit_base_patch16_siglip_gap_224", "swin_tiny_patch4_window7_224", "vit_base_patch16_siglip_224",
                 "aimv2_large_patch14_224", "vit_small_patch16_dinov3", "eva02_small_patch14_224"):
        assert timm.is_model(f"vpt_{name}"), name
    # what prompt() refuses has no name: distillation token, other blocks, differential attention
    for name in ("deit_tiny_distilled_patch16_224", "vit_base_patch16_rpn_224", "vit_base_patch16_xp_224",
                 "vit_small_patch16_18x2_224", "vit_dwee_patch16_reg1_gap_256", "eva02_enormous_patch14_clip_224"):
        assert name in bases and not timm.is_model(f"vpt_{name}"), name


def test_the_filter_is_prompts_own_verdict(monkeypatch):
    """register_timm asks prompt() itself: a model family prompt() learns is registered, one it drops
    is not, with no list to update."""
    import vpt_fast.prompting
    monkeypatch.setattr(timm_models, "_verdicts", {})
    assert not prompt_accepts("deit_tiny_distilled_patch16_224")
    monkeypatch.setattr(timm_models, "_verdicts", {})
    monkeypatch.setattr(vpt_fast.prompting, "prompt", lambda model, **kwargs: model)
    assert prompt_accepts("eva02_tiny_patch14_224") and prompt_accepts("deit_tiny_distilled_patch16_224")

    def refuse(model, **kwargs):
        raise TypeError("unsupported")
    monkeypatch.setattr(timm_models, "_verdicts", {})
    monkeypatch.setattr(vpt_fast.prompting, "prompt", refuse)
    assert not prompt_accepts("vit_tiny_patch16_224") and not prompt_accepts("swin_tiny_patch4_window7_224")


@pytest.mark.slow  # every candidate built at full size on the meta device
def test_registered_names_are_exactly_those_prompt_accepts():
    """The verdicts come from models built with one block per stage; here every candidate is built at
    timm's full depth (on the meta device, random init skipped as register_timm does: meta tensors hold
    no values): each registered name creates a prompted model, and prompt() refuses each base model
    that got no name, with its own TypeError (not an artefact of the meta device)."""
    vpt_fast.register_timm()
    refused = {}
    for base in timm.list_models(module=list(BASE_MODULES)):
        with warnings.catch_warnings(), torch.device("meta"), timm_models._NoRandomInit():
            warnings.simplefilter("ignore")
            if timm.is_model(f"vpt_{base}"):
                assert isinstance(timm.create_model(f"vpt_{base}", num_prompts=1, backend="reference"),
                                  PromptedModel), base
                continue
            model = timm.create_model(base)
            with pytest.raises(TypeError) as error:
                vpt_fast.prompt(model, num_prompts=1, backend="reference")
            refused[base] = str(error.value)
    assert len(refused) >= 10 and "deit_tiny_distilled_patch16_224" in refused
    assert "EvaBlockPostNorm" in refused["eva02_enormous_patch14_clip_224"]
    assert "DiffAttention" in refused["vit_dwee_patch16_reg1_gap_256"]
    for family_member in ("vit_base_patch16_siglip_224", "aimv2_large_patch14_224", "vit_small_patch16_dinov3",
                          "eva02_small_patch14_224", "vit_pe_core_small_patch16_384",
                          "vit_base_patch16_rope_mixed_224"):
        assert family_member not in refused and timm.is_model(f"vpt_{family_member}"), family_member


def test_pretrained_cfgs_are_the_base_models():
    vpt_fast.register_timm()
    for name in ("vit_base_patch16_224", "vit_base_patch16_224.augreg_in21k", "swin_tiny_patch4_window7_224",
                 "vit_small_patch14_dinov2.lvd142m"):
        assert get_pretrained_cfg(f"vpt_{name}") == get_pretrained_cfg(name), name
    tagged = timm.create_model("vpt_vit_tiny_patch16_224.augreg_in21k", pretrained=False, **TINY_VIT, num_prompts=2)
    base = timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=False, **TINY_VIT)
    # the same config, except that rebuilding from it (a Hub push's config.json) builds the prompted model
    vpt_cfg = {**base.pretrained_cfg, "architecture": "vpt_vit_tiny_patch16_224"}
    assert tagged.pretrained_cfg == vpt_cfg and tagged.default_cfg == vpt_cfg
    assert tagged.pretrained_cfg["tag"] == "augreg_in21k"
    assert tagged.pretrained_cfg["hf_hub_id"] == "timm/vit_tiny_patch16_224.augreg_in21k"  # the base weights
    untagged = timm.create_model("vpt_vit_tiny_patch16_224", pretrained=False, **TINY_VIT, num_prompts=2)
    assert untagged.pretrained_cfg == {**timm.create_model("vit_tiny_patch16_224", **TINY_VIT).pretrained_cfg,
                                       "architecture": "vpt_vit_tiny_patch16_224"}


def test_kwargs_go_to_prompt_and_to_the_base_model():
    vpt_fast.register_timm()
    torch.manual_seed(0)
    model = timm.create_model("vpt_vit_tiny_patch16_224", pretrained=False, **TINY_VIT, num_prompts=3,
                              deep=False, project=8, dropout=0.1, backend="torch", recompute="mlp")
    assert model.vpt_config.to_dict() == dict(num_prompts=3, deep=False, dropout=0.1, project=8,
                                              backend="torch", recompute="mlp")
    assert model.embed_dim == 48 and len(model.blocks) == 2 and model.num_classes == 5
    torch.manual_seed(0)  # the same model as prompt() on the base model: same draws, same logits
    expected = vpt_fast.prompt(timm.create_model("vit_tiny_patch16_224", **TINY_VIT), num_prompts=3, deep=False,
                               project=8, dropout=0.1, backend="torch", recompute="mlp")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), expected.eval()(x))
    swin = timm.create_model("vpt_swin_tiny_patch4_window7_224", **TINY_SWIN, num_prompts=2)
    assert [tuple(p.shape) for p in swin.vpt.state_tensors().values()] == [(2, 2, 32), (2, 2, 64)]
    assert swin(torch.randn(1, 3, 56, 56)).shape == (1, 5)


@pytest.mark.slow  # a fresh Python process
def test_launcher_runs_a_train_script_with_vpt_models(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, timm\n"
        "def main():\n"
        "    model = timm.create_model(sys.argv[2], img_size=32, patch_size=8, embed_dim=48, depth=1,\n"
        "                              num_heads=3, num_prompts=int(sys.argv[4]))\n"
        "    print(sys.argv[0], type(model).__name__, tuple(model.vpt.prompts.shape))\n"
        "if __name__ == '__main__':\n"
        "    main()\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "timm_train.py"), str(script),
                           "--model", "vpt_vit_tiny_patch16_224", "--num-prompts", "4"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == str(script)  # train.py sees its own argv
    assert proc.stdout.split()[-3:] == ["(1,", "4,", "48)"]


# tiny versions of a ViT and a DINOv3 (timm Eva: RoPE, 4 storage tokens, LayerScale)
TINY_TRAIN_PY = dict(num_prompts=4, deep=False, project=8, img_size=32, patch_size=8, embed_dim=48, depth=2,
                     num_heads=3)
TRAIN_PY_MODELS = ("vpt_vit_tiny_patch16_224", "vpt_vit_small_patch16_dinov3")


@pytest.mark.skipif(not os.environ.get("TIMM_TRAIN_PY"), reason="set TIMM_TRAIN_PY to timm's train.py to run it")
@pytest.mark.parametrize("model_name", TRAIN_PY_MODELS)
def test_timm_train_py_then_export(tmp_path, model_name):
    """timm's own train.py (from a pytorch-image-models checkout) trains a tiny vpt_ model for one
    epoch on a 4-image folder with an EMA; `vpt-fast export` turns its checkpoint into a prompt file
    that holds exactly the checkpoint's prompts and head."""
    from PIL import Image
    vpt_fast.register_timm()  # the model is created below by name, also when this test runs alone
    for split in ("train", "validation"):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            Image.new("RGB", (40, 40), (200 if label == "a" else 20, 90, 30)).save(
                tmp_path / "data" / split / label / "0.png")
    model_kwargs = [f"{key}={value}" for key, value in TINY_TRAIN_PY.items()]
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "timm_train.py"), os.environ["TIMM_TRAIN_PY"],
                    "--data-dir", "data", "--model", model_name, "--num-classes", "2",
                    "--model-kwargs", *model_kwargs, "--img-size", "32", "-b", "2", "--epochs", "1",
                    "--warmup-epochs", "0", "--device", "cpu", "--no-prefetcher", "-j", "0", "--model-ema",
                    "--output", "out", "--experiment", "run", "--opt", "sgd", "--lr", "0.5"],
                   cwd=tmp_path, check=True, capture_output=True)
    checkpoint = tmp_path / "out" / "run" / "last.pth.tar"
    from vpt_fast.io import read_train_checkpoint
    for ema in (False, True):
        out = tmp_path / f"prompts_{ema}.safetensors"
        subprocess.run([sys.executable, "-m", "vpt_fast", "export", str(checkpoint), str(out)] + ["--ema"] * ema,
                       check=True, capture_output=True)
        model = timm.create_model(model_name, num_classes=2, **TINY_TRAIN_PY)
        # random weights: this backbone is not train.py's (the file records that one), hence no backbone check
        vpt_fast.load_prompts(model, out, check_backbone=False)
        state, _ = read_train_checkpoint(checkpoint, ema=ema)
        for name, tensor in vpt_fast.prompt_state_dict(model).items():
            key = "vpt." + name if not name.startswith("head.") else name
            assert torch.equal(tensor, state[key]), name


def test_pretrained_weights_load_into_the_prompted_model(tmp_path):
    """pretrained=True goes through the base model's loader (here from a local file instead of the
    hub): backbone weights are the file's, the head is adapted to num_classes as timm does."""
    vpt_fast.register_timm()
    weights = timm.create_model("vit_tiny_patch16_224", **dict(TINY_VIT, num_classes=1000)).state_dict()
    path = tmp_path / "weights.pth"
    torch.save(weights, path)
    model = timm.create_model("vpt_vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **TINY_VIT, num_prompts=2)
    loaded = model.state_dict()
    backbone = [k for k in weights if not k.startswith("head.")]
    assert backbone and all(torch.equal(loaded[k], weights[k]) for k in backbone)
    assert loaded["head.weight"].shape == (5, 48) and tuple(model.vpt.prompts.shape) == (2, 2, 48)
