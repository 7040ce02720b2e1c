"""Train VPT prompts and the classifier head on an image folder, evaluate every epoch, save the prompts.

Data layout (torchvision ImageFolder, the layout timm's train.py reads too):

    DATA/train/<class name>/*.jpg|png|...
    DATA/val/<class name>/*.jpg|png|...

    python examples/train_imagefolder.py DATA --model vit_base_patch16_224.augreg_in21k \
        --epochs 100 --batch 64 --lr 1.0 --wd 1e-4 --num-prompts 50 --out task.safetensors

Then `python examples/predict.py task.safetensors IMAGES...` serves it.

What it does, step by step (each step is a few lines below):
1. timm.create_model(name, pretrained=True, num_classes=<classes found under DATA/train>), then
   vpt_fast.prompt(): the backbone is frozen, prompts + head train.
2. Transforms from the backbone's pretrained_cfg (timm.data.resolve_data_config + create_transform):
   the mean/std, interpolation and crop the weights were trained with; timm's training augmentation
   for the train split, resize + center crop for val.
3. The VPT paper's optimiser (Jia et al. 2022, Appendix; the released code's configs/base-prompt.yaml
   and tune_fgvc.py): SGD, momentum 0.9, learning rate = base lr x batch / 256, linear warmup (10 of
   100 epochs) then cosine decay to 0, weight decay on everything but the head's bias, batch 64 or 128.
   The paper grid-searches the base lr over {50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1} and the weight
   decay over {0.01, 0.001, 0.0001, 0} per dataset on a validation split. The defaults here (base lr
   1.0, weight decay 1e-4, the released config's value) are one starting point from that grid, not a
   tuned value: search the grid for your data.
4. Every epoch: train, then top-1 accuracy and loss on DATA/val (model.eval(), torch.inference_mode).
5. vpt_fast.save_prompts(model, OUT) (prompts + head, with metadata), and OUT with suffix .json: the
   model name, pretrained flag, model kwargs, seed and class names predict.py needs.

--no-pretrained builds a randomly initialised backbone (seeded by --seed, so predict.py rebuilds the same
one); the tests use it because nothing can be downloaded there.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.utils import ParseKwargs
from torchvision.datasets import ImageFolder

import vpt_fast
from vpt_fast.backends import BACKENDS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", help="folder with train/ and val/ subfolders, one folder per class in each")
    p.add_argument("--model", default="vit_base_patch16_224.augreg_in21k",
                   help="timm model name, optionally with a pretrained tag (name.tag)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="load the timm pretrained weights (--no-pretrained: random backbone, seeded)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's own)")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="more timm.create_model keywords, key=value (e.g. global_pool=avg)")
    p.add_argument("--num-prompts", type=int, default=50)
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--deep", dest="deep", action="store_true", default=True, help="VPT-Deep")
    depth.add_argument("--shallow", dest="deep", action="store_false", help="VPT-Shallow")
    p.add_argument("--prompt-dropout", type=float, default=0.0)
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="vpt_fast backend (auto: triton on CUDA tensors when Triton is usable, else torch)")
    p.add_argument("--recompute", default="none", choices=("none", "mlp", "block"))
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--warmup-epochs", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.0,
                   help="base learning rate; the optimiser uses lr x batch / 256 (paper grid: 50 ... 0.1)")
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay (paper grid: 0.01, 0.001, 0.0001, 0)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="run forward and backward under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the prompted model")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="task.safetensors", help="prompt file to write (and OUT .json beside it)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch", "num_prompts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def model_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(args.model_kwargs)
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    return kwargs


def data_config(model: torch.nn.Module) -> dict:
    """The backbone's preprocessing (pretrained_cfg), at the size the model was built for."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    overrides = {"input_size": (3, *img_size)} if img_size is not None else {}
    return resolve_data_config(overrides, model=model)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warmup to 1 over warmup_steps, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def evaluate(model, loader, device, bf16: bool) -> tuple[float, float]:
    """(top-1 accuracy, mean loss) over `loader`, in eval mode without gradients."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.inference_mode(), autocast(device, bf16):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images).float()
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
    return correct / total, loss_sum / total


def main(argv: list[str] | None = None) -> torch.nn.Module:
    args = parse_args(argv)
    device = torch.device(args.device)
    root = Path(args.data)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            sys.exit(f"{root / split} is not a folder: DATA needs train/ and val/, one subfolder per class")

    classes = ImageFolder(root / "train").classes
    torch.manual_seed(args.seed)  # a --no-pretrained backbone is then the same in predict.py
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=len(classes),
                              **model_kwargs(args))
    model = vpt_fast.prompt(model, num_prompts=args.num_prompts, deep=args.deep,
                            dropout=args.prompt_dropout, backend=args.backend, recompute=args.recompute)
    model.to(device)
    trainable, total = vpt_fast.trainable_parameters(model)
    print(f"{args.model}: {trainable:,} trainable of {total:,} parameters "
          f"({args.num_prompts} {'deep' if args.deep else 'shallow'} prompts, backend {args.backend})")

    config = data_config(model)
    train_set = ImageFolder(root / "train", transform=create_transform(**config, is_training=True))
    val_set = ImageFolder(root / "val", transform=create_transform(**config, is_training=False))
    if val_set.classes != classes:
        sys.exit(f"train/ and val/ have different class folders: {classes} vs {val_set.classes}")
    loader_kwargs = dict(batch_size=args.batch, num_workers=args.workers, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_set, shuffle=True, drop_last=len(train_set) > args.batch,
                                               **loader_kwargs)
    val_loader = torch.utils.data.DataLoader(val_set, shuffle=False, **loader_kwargs)

    # SGD as in the paper: lr scaled by batch / 256, no weight decay on the head's bias
    lr = args.lr * args.batch / 256
    head_bias = {id(p) for n, p in model.get_classifier().named_parameters() if n.endswith("bias")}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in head_bias], "weight_decay": args.wd},
              {"params": [p for p in params if id(p) in head_bias], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=args.momentum)
    steps_per_epoch = len(train_loader)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = min(total_steps, max(1, round(args.warmup_epochs * steps_per_epoch)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, warmup_steps, total_steps))
    print(f"SGD lr {lr:g} (base {args.lr:g} x batch {args.batch} / 256), momentum {args.momentum}, "
          f"weight decay {args.wd:g}, {args.epochs} epochs, {warmup_steps} warmup steps of {total_steps}, "
          f"{len(train_set)} train / {len(val_set)} val images, {len(classes)} classes")

    step_fn = torch.compile(model) if args.compile else model
    for epoch in range(1, args.epochs + 1):
        model.train()  # prompts' dropout and the head follow train(); the frozen backbone stays in eval
        start, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
        for images, labels in train_loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, args.bf16):
                loss = torch.nn.functional.cross_entropy(step_fn(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += labels.numel()
            loss_sum += loss.detach() * labels.numel()  # no host sync per step
        elapsed = time.perf_counter() - start
        acc, val_loss = evaluate(step_fn, val_loader, device, args.bf16)
        print(f"epoch {epoch}/{args.epochs}: train loss {loss_sum.item() / seen:.4f} ({seen / elapsed:.1f} img/s), "
              f"val loss {val_loss:.4f}, val top-1 {100 * acc:.2f}%", flush=True)

    out = Path(args.out)
    vpt_fast.save_prompts(model, out)
    info = {"model": args.model, "pretrained": args.pretrained, "model_kwargs": model_kwargs(args),
            "seed": args.seed, "classes": classes, "backend": args.backend}
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out} ({os.path.getsize(out):,} bytes) and {out.with_suffix('.json')}")
    return model


if __name__ == "__main__":
    main()
