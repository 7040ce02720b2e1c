"""Prompt checkpoints from other sources (docs/design.md §4): entry validation (dtype, NaN/inf),
whole-model state dicts (ViT, Swin, DDP `module.` prefix), and `vpt-fast export` of a checkpoint
written the way timm's train.py writes it (timm.utils.CheckpointSaver)."""
from __future__ import annotations

import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file

import vpt_fast
from utils import prompted_swin, tiny_vit
from utils import prompted_vit as prompted
from vpt_fast.cli import main as cli
from vpt_fast.io import export_train_checkpoint, metadata

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def assert_state_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def perturbed(state: dict, name: str, value: torch.Tensor) -> dict:
    return dict(state, **{name: value})


BAD_ENTRIES = {
    "int32": (lambda t: t.to(torch.int32), "dtype torch.int32"),
    "bool": (lambda t: t > 0, "dtype torch.bool"),
    "nan": (lambda t: t.index_put((torch.tensor([0]),), torch.tensor(float("nan"))), "non-finite"),
    "inf": (lambda t: t.flatten().index_put((torch.tensor([3]),), torch.tensor(float("inf"))).view_as(t),
            "non-finite"),
}


@pytest.mark.parametrize("bad", list(BAD_ENTRIES))
@pytest.mark.parametrize("entry", ["prompts", "head.bias"])
def test_non_floating_or_non_finite_entries_are_refused(tmp_path, bad, entry):
    make_bad, message = BAD_ENTRIES[bad]
    source = prompted(seed=1, num_prompts=4)
    state = vpt_fast.prompt_state_dict(source)
    state[entry] = make_bad(state[entry])
    model = prompted(seed=1, num_prompts=4)  # the source's backbone, other prompts and head
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    before = vpt_fast.prompt_state_dict(model)
    with pytest.raises(ValueError, match=f"{entry!r}.*{message}"):
        vpt_fast.load_prompt_state_dict(model, state)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata(source))
    with pytest.raises(ValueError, match=f"{entry!r}.*{message}"):
        vpt_fast.load_prompts(model, path)
    assert_state_equal(vpt_fast.prompt_state_dict(model), before)


def test_floating_entries_are_cast_like_load_state_dict():
    source = prompted(seed=1, num_prompts=4, project=16)
    state = {name: t.double() for name, t in vpt_fast.prompt_state_dict(source).items()}
    model = prompted(seed=2, num_prompts=4, project=16)
    vpt_fast.load_prompt_state_dict(model, state)
    assert_state_equal(vpt_fast.prompt_state_dict(model), vpt_fast.prompt_state_dict(source))


@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "ddp"])
def test_whole_model_state_dict_vit(prefix):
    source = prompted(seed=1, num_prompts=4, deep=True, project=16)
    full = {prefix + k: v for k, v in source.state_dict().items()}
    model = prompted(seed=2, num_prompts=4, deep=True, project=16)
    vpt_fast.load_prompt_state_dict(model, full)
    assert_state_equal(vpt_fast.prompt_state_dict(model), vpt_fast.prompt_state_dict(source))


def test_whole_model_state_dict_swin():
    source = prompted_swin(seed=1, num_prompts=3, deep=True)
    full = source.state_dict()
    assert "head.fc.weight" in full and "vpt.prompts.1" in full  # Swin's classifier is head.fc
    model = prompted_swin(seed=2, num_prompts=3, deep=True)
    vpt_fast.load_prompt_state_dict(model, full)
    assert_state_equal(vpt_fast.prompt_state_dict(model), vpt_fast.prompt_state_dict(source))


def test_whole_model_state_dict_is_strict():
    model = prompted(seed=2, num_prompts=4)
    before = vpt_fast.prompt_state_dict(model)
    projected = prompted(seed=1, num_prompts=4, project=16).state_dict()
    with pytest.raises(ValueError, match="unexpected \\['proj.bias', 'proj.weight'\\]"):
        vpt_fast.load_prompt_state_dict(model, projected)
    plain = vpt_fast.prompt_state_dict(prompted(seed=1, num_prompts=4))
    headless = {k: v for k, v in prompted(seed=1, num_prompts=4).state_dict().items() if not k.startswith("head.")}
    with pytest.raises(ValueError, match="missing \\['head.bias', 'head.weight'\\]"):
        vpt_fast.load_prompt_state_dict(model, headless)
    nan_prompts = dict(prompted(seed=1, num_prompts=4).state_dict(), **{"vpt.prompts": plain["prompts"] * float("nan")})
    with pytest.raises(ValueError, match="'prompts'.*non-finite"):
        vpt_fast.load_prompt_state_dict(model, nan_prompts)
    with pytest.raises(ValueError, match="must be a prompted model's"):
        vpt_fast.load_prompt_state_dict(model, tiny_vit().state_dict())
    assert_state_equal(vpt_fast.prompt_state_dict(model), before)


def train_py_checkpoint(out_dir, model_kwargs: dict, seed: int = 0, with_args: bool = True,
                        model_name: str = "vpt_vit_tiny_patch16_224"):
    """A prompted model after one SGD step, with an EMA, saved by timm's CheckpointSaver with the
    argparse namespace train.py passes (the fields export reads, plus a few others)."""
    from timm.utils import CheckpointSaver, ModelEmaV3
    vpt_fast.register_timm()
    args = argparse.Namespace(model=model_name, num_classes=6, gp=None, in_chans=None,
                              input_size=None, model_kwargs=dict(model_kwargs), lr=0.1, epochs=1,
                              drop_path=None, pretrained=False)
    torch.manual_seed(seed)
    model = timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    ema = ModelEmaV3(model, decay=0.5)
    x, y = torch.randn(2, 3, *model.patch_embed.img_size), torch.tensor([1, 4])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    ema.update(model)
    saver = CheckpointSaver(model, optimizer, args=args if with_args else None, model_ema=ema,
                            checkpoint_dir=str(out_dir), recovery_dir=str(out_dir))
    saver.save_checkpoint(epoch=0, metric=0.5)
    return out_dir / "last.pth.tar", model, ema.module


@pytest.mark.parametrize("ema", [False, True], ids=["model", "ema"])
def test_export_train_py_checkpoint(tmp_path, capsys, ema):
    kwargs = dict(TINY_VIT, num_prompts=3, deep=True, project=8)
    checkpoint, model, ema_model = train_py_checkpoint(tmp_path, kwargs)
    out = tmp_path / "prompts.safetensors"
    cli(["export", str(checkpoint), str(out)] + (["--ema"] if ema else []))
    printed = capsys.readouterr().out
    assert "vit_tiny_patch16_224 with 3 deep prompts" in printed and " KB)" in printed
    expected = vpt_fast.prompt_state_dict(ema_model if ema else model)
    assert not torch.equal(expected["prompts"], vpt_fast.prompt_state_dict(ema_model if not ema else model)["prompts"])
    torch.manual_seed(5)
    fresh = vpt_fast.prompt(timm.create_model("vit_tiny_patch16_224", num_classes=6, **TINY_VIT),
                            num_prompts=3, deep=True, project=8)
    with pytest.raises(ValueError, match="trained on another backbone"):  # the file records the checkpoint's
        vpt_fast.load_prompts(fresh, out)
    fresh.load_state_dict(model.state_dict())  # the backbone the prompts were trained on (and the prompts)
    vpt_fast.load_prompt_state_dict(fresh, vpt_fast.prompt_state_dict(ema_model if not ema else model))
    vpt_fast.load_prompts(fresh, out)
    assert_state_equal(vpt_fast.prompt_state_dict(fresh), expected)
    assert out.stat().st_size < checkpoint.stat().st_size / 20


def test_export_needs_the_configuration_without_args(tmp_path, capsys):
    kwargs = dict(TINY_VIT, num_prompts=3, deep=False)
    checkpoint, model, _ = train_py_checkpoint(tmp_path, kwargs, with_args=False)
    out = tmp_path / "prompts.safetensors"
    with pytest.raises(SystemExit, match="2"):
        cli(["export", str(checkpoint), str(out)])
    assert "argument checkpoint: " in capsys.readouterr().err  # the cli's usage line; the library raises:
    with pytest.raises(ValueError, match="does not name its model"):
        export_train_checkpoint(checkpoint, out)
    base = ["export", str(checkpoint), str(out), "--model", "vit_tiny_patch16_224", "--num-classes", "6",
            "--shallow"]
    with pytest.raises(SystemExit, match="2"):
        cli(base)  # the default num_prompts (50) and width (vit_tiny's 192) do not match: refused
    assert "'prompts' has shape (1, 3, 48), the model expects (1, 50, 192)" in capsys.readouterr().err
    exported = export_train_checkpoint(checkpoint, out, model_name="vit_tiny_patch16_224", num_classes=6,
                                       **kwargs)
    assert_state_equal(vpt_fast.prompt_state_dict(exported), vpt_fast.prompt_state_dict(model))
    vpt_fast.load_prompts(exported, out)
    torch.save({"state_dict": model.state_dict(), "epoch": 0}, tmp_path / "no_ema.pth.tar")
    with pytest.raises(SystemExit, match="2"):
        cli(["export", str(tmp_path / "no_ema.pth.tar"), str(out), "--ema", "--model", "vit_tiny_patch16_224"])
    assert "no 'state_dict_ema'" in capsys.readouterr().err


def test_export_swin_train_py_checkpoint(tmp_path):
    kwargs = dict(img_size=56, window_size=7, embed_dim=16, depths=(1, 1), num_heads=(1, 2), drop_path_rate=0.0,
                  num_prompts=2, deep=False)
    checkpoint, model, _ = train_py_checkpoint(tmp_path, kwargs, model_name="vpt_swin_tiny_patch4_window7_224")
    out = tmp_path / "prompts.safetensors"
    cli(["export", str(checkpoint), str(out)])
    fresh = timm.create_model("vpt_swin_tiny_patch4_window7_224", num_classes=6, **kwargs)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("vpt.", "head."))},
                          strict=False)  # the checkpoint's backbone, fresh prompts and head
    vpt_fast.load_prompts(fresh, out)
    expected = vpt_fast.prompt_state_dict(model)
    assert set(expected) == {"prompts.0", "head.weight", "head.bias"}  # head.fc in the model's state_dict
    assert_state_equal(vpt_fast.prompt_state_dict(fresh), expected)
