"""Serve a prompt file: rebuild the prompted model, load the prompts, print the top-k classes per image.

    python examples/predict.py task.safetensors photo.jpg more_photos/ --topk 3

A prompt file (vpt_fast.save_prompts, `vpt-fast export`, examples/train_imagefolder.py) holds the
prompts (+ projection) and the classifier head, not the frozen backbone. Its metadata names the timm
architecture, num_classes, num_prompts, deep/shallow, the projection (and, from newer versions, the
image size and pooling); the model is rebuilt from those, step by step:

    model = timm.create_model(name, pretrained=True, num_classes=...)   # the backbone's weights
    model = vpt_fast.prompt(model, num_prompts=..., deep=..., project=...)
    vpt_fast.load_prompts(model, "task.safetensors")   # refuses a file made for another configuration
    model.eval()
    with torch.inference_mode():                       # the prompt K/V cache is used
        probs = model(images).softmax(-1)

The metadata has the architecture without the pretrained tag, so give `--model name.tag` when you
trained on a tagged checkpoint (the backbone weights must be the ones the prompts were trained on).
examples/train_imagefolder.py also writes OUT.json beside the prompt file (model name with its tag,
pretrained flag, model kwargs such as img_size, seed, class names); it is read when present, and
arguments given here take precedence. Without class names the class index is printed.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from PIL import Image
from safetensors import safe_open
from timm.data import create_transform, resolve_data_config
from timm.utils import ParseKwargs

import vpt_fast
from vpt_fast.backends import BACKENDS

IMAGE_SUFFIXES = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp"}


class Predictions(NamedTuple):
    paths: list[Path]
    inputs: torch.Tensor   # the preprocessed images, (N, 3, H, W)
    logits: torch.Tensor   # (N, num_classes), float32, on the CPU
    model: torch.nn.Module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompts", help="a prompt file (.safetensors)")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--model", default=None,
                   help="timm name[.tag] of the backbone (default: OUT.json's, else the file's architecture)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="load timm's pretrained weights (default: OUT.json's value, else yes)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="more timm.create_model keywords, key=value")
    p.add_argument("--classes", default=None, help="class names, comma-separated, in class-index order")
    p.add_argument("--seed", type=int, default=None, help="seed of a --no-pretrained backbone")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    if args.topk < 1 or args.batch < 1:
        p.error(f"--topk and --batch must be at least 1, got {args.topk} and {args.batch}")
    return args


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def find_images(names: list[str]) -> list[Path]:
    paths = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            sys.exit(f"{path}: no such file or folder")
    if not paths:
        sys.exit(f"no images found in {names}")
    return paths


def build_model(args: argparse.Namespace, meta: dict[str, str], info: dict) -> torch.nn.Module:
    """The prompted model the prompt file was trained with, prompts and head loaded, in eval mode."""
    name = args.model or info.get("model") or meta.get("architecture")
    if not name:
        sys.exit(f"{args.prompts} does not name its architecture: pass --model")
    pretrained = args.pretrained if args.pretrained is not None else info.get("pretrained", True)
    # model settings: the file's (files from newer vpt_fast record img_size and global_pool), then OUT.json's,
    # then the arguments
    kwargs = {k: ast.literal_eval(meta[k]) if k == "img_size" else meta[k]
              for k in ("img_size", "global_pool") if meta.get(k, "None") != "None"}
    kwargs.update(info.get("model_kwargs", {}))
    kwargs.update(args.model_kwargs)
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    project = meta.get("project", "None")
    seed = args.seed if args.seed is not None else info.get("seed", 0)
    torch.manual_seed(seed)  # the same random backbone as training when pretrained is off
    model = timm.create_model(name, pretrained=pretrained, num_classes=int(meta["num_classes"]), **kwargs)
    model = vpt_fast.prompt(model, num_prompts=int(meta["num_prompts"]), deep=meta["deep"] == "True",
                            project=None if project == "None" else int(project), backend=args.backend)
    vpt_fast.load_prompts(model, args.prompts)
    return model.to(args.device).eval()


def main(argv: list[str] | None = None) -> Predictions:
    args = parse_args(argv)
    prompts = Path(args.prompts)
    meta = read_metadata(prompts)
    sidecar = prompts.with_suffix(".json")
    info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    model = build_model(args, meta, info)
    classes = args.classes.split(",") if args.classes else info.get("classes")
    if classes is not None and len(classes) != model.num_classes:
        sys.exit(f"{len(classes)} class names for a head of {model.num_classes} classes")

    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    config = resolve_data_config({"input_size": (3, *img_size)} if img_size else {}, model=model)
    transform = create_transform(**config, is_training=False)
    paths = find_images(args.images)
    inputs = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])

    logits = []
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)
    with torch.inference_mode(), autocast:
        for batch in inputs.split(args.batch):
            logits.append(model(batch.to(args.device)).float().cpu())
    logits = torch.cat(logits)
    probs = logits.softmax(-1)
    top = probs.topk(min(args.topk, probs.shape[1]), dim=-1)
    for path, p, idx in zip(paths, top.values.tolist(), top.indices.tolist()):
        labels = [classes[i] if classes else str(i) for i in idx]
        print(f"{path}: " + ", ".join(f"{label} {q:.3f}" for label, q in zip(labels, p)))
    return Predictions(paths, inputs, logits, model)


if __name__ == "__main__":
    main()
