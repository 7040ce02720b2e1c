"""DistributedDataParallel (gloo, 2 CPU processes): each rank takes half the batch and DDP averages
the gradients, which must equal one process's gradients of the mean loss over the whole batch, for
prompts, projection and head. DDP runs with find_unused_parameters=False (timm train.py's setting):
a second step would raise if any trainable parameter had been left without a gradient."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import vpt_fast
from utils import assert_close, tiny_vit

WORLD_SIZE = 2
BATCH = 4
VARIANTS = {
    "vit_deep": dict(num_prompts=3, deep=True),
    "vit_deep_recompute_block": dict(num_prompts=3, deep=True, recompute="block"),  # checkpointed blocks
    "vit_shallow_projected": dict(num_prompts=3, deep=False, project=8),
    "swin_deep": dict(num_prompts=2, deep=True),
}


def build(variant: str) -> torch.nn.Module:
    import timm
    torch.manual_seed(0)
    if variant.startswith("swin"):
        base = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, window_size=7, embed_dim=16,
                                 depths=(1, 1), num_heads=(1, 2), num_classes=5, drop_path_rate=0.0)
    else:
        base = tiny_vit()
    model = vpt_fast.prompt(base, backend="torch", **VARIANTS[variant])
    with torch.no_grad():  # random, not initial, trainable state
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model.train()


def batch(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, *model.patch_embed.img_size, generator=g)
    return x, torch.randint(0, model.num_classes, (BATCH,), generator=g)


def trainable_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    results = {}
    for variant in VARIANTS:
        model = build(variant)
        ddp = DistributedDataParallel(model)  # find_unused_parameters=False
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        x, y = batch(model)
        own = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        for step in range(2):
            optimizer.zero_grad()
            F.cross_entropy(ddp(x[own]), y[own]).backward()
            if step == 0:
                results[variant] = trainable_grads(model)
            optimizer.step()
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned processes, each importing torch and timm
def test_ddp_gradients_equal_one_process_on_the_full_batch(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD_SIZE, join=True)
    distributed = torch.load(out)
    for variant in VARIANTS:
        model = build(variant)
        F.cross_entropy(model(*batch(model)[:1]), batch(model)[1]).backward()
        expected = trainable_grads(model)
        assert distributed[variant].keys() == expected.keys()
        for name, grad in expected.items():
            assert grad.abs().sum() > 0, f"{variant}: {name} has no gradient"
            assert_close(distributed[variant][name], grad, atol=1e-6, rtol=1e-4, name=f"{variant}: {name}")
