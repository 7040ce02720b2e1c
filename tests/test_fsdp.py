"""FSDP2 (`torch.distributed.fsdp.fully_shard`, gloo, 2 CPU processes), as README "multi-GPU" shards a
prompted model: `fully_shard` on every prompt-aware block (frozen: only its slice of the weights stays
on a rank) and then on the root (prompts, projection, head and the rest of the backbone). Each rank
takes half the batch; losses, the gathered prompt/projection/head gradients, the parameters after SGD
steps and the no-grad logits must equal one process on the whole batch, for ViT, Swin and DINOv3
(Eva), deep and shallow + projection, recompute 'block' and 'mlp', and with blocks kept gathered
after forward (`reshard_after_forward=False`, where the prompt K/V cache is used). Prompt files:
`save_prompts` of a sharded model (a collective; rank 0 writes) loads into an unsharded model, and
files load into sharded models on every rank. A `PromptBank` trains mixed tasks under FSDP2 (a task
present on one rank only included) and refuses `add` after sharding.

One spawn runs every check (process start-up dominates); the tests compare its results."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import vpt_fast
from utils import assert_close, randomize, tiny_swin, tiny_vit

WORLD_SIZE = 2
BATCH = 4
STEPS = 2
# name: (family, prompt() keywords, reshard_after_forward of the blocks)
VARIANTS = {
    "vit_deep": ("vit", dict(deep=True), True),
    "vit_shallow_projected": ("vit", dict(deep=False, project=8), True),
    "vit_deep_recompute_block": ("vit", dict(deep=True, recompute="block"), True),
    "vit_deep_recompute_mlp": ("vit", dict(deep=True, recompute="mlp"), True),
    "vit_deep_kept_gathered": ("vit", dict(deep=True), False),
    "vit_shallow_kept_gathered": ("vit", dict(deep=False), False),
    "swin_deep": ("swin", dict(deep=True), True),
    "swin_shallow_projected_recompute_block": ("swin", dict(deep=False, project=8, recompute="block"), True),
    "swin_deep_kept_gathered": ("swin", dict(deep=True, recompute="mlp"), False),
    "dinov3_deep": ("dinov3", dict(deep=True), True),
    "dinov3_shallow_projected": ("dinov3", dict(deep=False, project=8), True),
    "dinov3_deep_recompute_block": ("dinov3", dict(deep=True, recompute="block"), True),
    "dinov3_deep_recompute_mlp": ("dinov3", dict(deep=True, recompute="mlp"), True),
}
SAVED = ("vit_deep", "swin_deep", "dinov3_deep")  # trained sharded, saved, loaded into fresh models
BANK_TASKS = ["task0", "task2", "task0", "task1", "task2", "task0"]  # rank 0's half has no task1
BANK_LABELS = [0, 1, 2, 3, 4, 0]


def base_model(family: str) -> torch.nn.Module:
    import timm
    if family == "vit":
        return tiny_vit()
    if family == "swin":
        return tiny_swin("w4", depths=(1, 1))
    return timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2, num_classes=5)


def build(variant: str, seed: int = 0) -> torch.nn.Module:
    family, kwargs, _ = VARIANTS[variant]
    torch.manual_seed(0)  # the same backbone for every seed
    model = vpt_fast.prompt(base_model(family), num_prompts=3, backend="torch", **kwargs)
    torch.manual_seed(seed)
    return randomize(model).train()


def shard(model: torch.nn.Module, mesh, reshard_after_forward: bool = True) -> torch.nn.Module:
    """README's recipe: every prompt-aware block (and Swin's patch merging), then the root."""
    from torch.distributed.fsdp import fully_shard
    for module in list(model.modules()):
        if module is not model and getattr(module, "is_vpt_block", False):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh)
    return model


def batch(model: torch.nn.Module, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(size, 3, *model.patch_embed.img_size, generator=g)
    return x, torch.randint(0, model.num_classes, (size,), generator=g)


def full(t: torch.Tensor) -> torch.Tensor:
    return vpt_fast.fsdp.full_tensor(t).detach().clone()


def run_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rank=None) -> dict:
    """STEPS SGD steps (each followed by two no-grad evaluations on the whole batch): losses, the
    first step's gradients, the no-grad logits and the trainable state after the last step. With
    `rank`, this rank trains on its half and the loss is the mean over ranks."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(params.values(), lr=0.5)
    own = slice(None) if rank is None else slice(rank * x.shape[0] // WORLD_SIZE, (rank + 1) * x.shape[0] // WORLD_SIZE)
    out = {"loss": [], "eval": [], "cached": []}
    for step in range(STEPS):
        model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[own]), y[own])
        loss.backward()
        loss = loss.detach().clone()
        if rank is not None:
            dist.all_reduce(loss)
            loss /= WORLD_SIZE
        out["loss"].append(loss)
        if step == 0:
            out["grads"] = {n: full(p.grad) for n, p in params.items()}
        optimizer.step()
        model.eval()
        with torch.no_grad():
            out["eval"] += [model(x), model(x)]  # the second may read the prompt K/V cache
        out["cached"].append(len(model.vpt.kv_cache))
    out["state"] = {n: full(p) for n, p in params.items()}
    return out


def bank_models(seed: int = 3) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    base = tiny_vit()
    models = []
    for t in range(3):  # one backbone for every task
        model = vpt_fast.prompt(copy.deepcopy(base), num_prompts=3, deep=True, project=6, backend="torch")
        torch.manual_seed(seed + t)
        models.append(randomize(model).train())
    return models


def bank_step(bank, x: torch.Tensor, rows: slice, rank=None) -> dict:
    """One mixed-task backward: the sum over tasks of each task's summed cross-entropy, divided by
    the (local) batch; gradients per task (gathered)."""
    tasks = BANK_TASKS[rows]
    labels = torch.tensor(BANK_LABELS[rows])
    out = bank(x[rows], tasks)
    loss = sum(F.cross_entropy(out[n], labels[[i for i, t in enumerate(tasks) if t == n]], reduction="sum")
               for n in out) / len(tasks)
    loss.backward()
    grads = {f"{name}.{n}": full(p.grad) for name, task in bank.tasks.items()
             for n, p in task.named_parameters()}
    bank.eval()
    with torch.no_grad():
        logits = bank(x, BANK_TASKS)
    return {"grads": grads, "eval": {n: v.clone() for n, v in logits.items()}, "present": sorted(set(tasks))}


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    results = {"variants": {}, "files": {}}
    for variant, (_, _, keep) in VARIANTS.items():
        model = build(variant)
        unsharded_structure = vpt_fast.backbone.structure(model)
        shard(model, mesh, reshard_after_forward=keep)
        sharded = vpt_fast.fsdp.any_dtensor((model.blocks if hasattr(model, "blocks") else model.layers).parameters())
        record = results["variants"][variant] = run_steps(model, *batch(model), rank=rank)
        record["dtensor_blocks"] = sharded
        record["same_structure"] = vpt_fast.backbone.structure(model) == unsharded_structure
        if variant in SAVED:
            # a collective: every rank gathers, rank 0 writes (each rank names its own file)
            vpt_fast.save_prompts(model, os.path.join(folder, f"{variant}.rank{rank}.safetensors"))
            dist.barrier()
            fresh = shard(build(variant, seed=5), mesh, reshard_after_forward=keep)
            vpt_fast.load_prompts(fresh, os.path.join(folder, f"{variant}.rank0.safetensors"))
            x, _ = batch(fresh)
            with torch.no_grad():
                results["files"][variant] = {"sharded_to_sharded": fresh.eval()(x),
                                             "state": vpt_fast.prompt_state_dict(fresh)}
                # a file written by one process (the main test process, before the spawn)
                # after a no-grad forward the root holds gathered copies: loading must reach the slices
                vpt_fast.load_prompts(fresh, os.path.join(folder, f"{variant}.unsharded.safetensors"))
                fresh.reshard()
                results["files"][variant]["unsharded_to_sharded"] = fresh(x)
    # PromptBank: tasks added first, then the model (blocks, root) and the bank sharded
    models = bank_models()
    bank = vpt_fast.PromptBank(models[0]).train()
    for t, task_model in enumerate(models):
        bank.add(f"task{t}", task_model)
    shard(models[0], mesh)
    fully_shard(bank, mesh=mesh)
    bank.set_reduce_scatter_unused_params(True)  # a task absent from one rank's half gets zeros there
    x, _ = batch(models[0], len(BANK_TASKS))
    half = len(BANK_TASKS) // WORLD_SIZE
    results["bank"] = bank_step(bank, x, slice(rank * half, (rank + 1) * half), rank)
    try:
        bank.add("late", models[1])
        results["bank"]["late_add"] = "accepted"
    except RuntimeError as error:
        results["bank"]["late_add"] = str(error)
    if rank == 0:
        torch.save(results, os.path.join(folder, "results.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    for variant in SAVED:
        vpt_fast.save_prompts(build(variant, seed=7), folder / f"{variant}.unsharded.safetensors")
    mp.spawn(_worker, args=(free_port(), str(folder)), nprocs=WORLD_SIZE, join=True)
    return folder, torch.load(folder / "results.pt", weights_only=False)


def _assert_same_run(got: dict, expected: dict, variant: str) -> None:
    for step, (a, b) in enumerate(zip(got["loss"], expected["loss"])):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name=f"{variant}: loss of step {step}")
    assert got["grads"].keys() == expected["grads"].keys()
    for name, grad in expected["grads"].items():
        assert grad.abs().sum() > 0, f"{variant}: {name} has no gradient"
        assert_close(got["grads"][name], grad, atol=1e-6, rtol=1e-4, name=f"{variant}: gradient of {name}")
    for name, value in expected["state"].items():
        assert_close(got["state"][name], value, atol=1e-6, rtol=1e-4, name=f"{variant}: {name} after {STEPS} steps")
    for i, (a, b) in enumerate(zip(got["eval"], expected["eval"])):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=f"{variant}: no-grad logits {i}")


@pytest.mark.slow  # one spawn of two processes for every test of this file
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp2_equals_one_process_on_the_full_batch(distributed, variant):
    _, results = distributed
    got = results["variants"][variant]
    assert got["dtensor_blocks"], "the blocks were not sharded"
    assert got["same_structure"], "fully_shard's FSDP<class> names leaked into the backbone structure"
    model = build(variant)
    expected = run_steps(model, *batch(model))
    _assert_same_run(got, expected, variant)
    if not VARIANTS[variant][2]:  # blocks kept gathered: the second no-grad forward read the cache
        assert all(n > 0 for n in got["cached"]) and expected["cached"] == got["cached"], got["cached"]
    else:  # sharded blocks: K/V computed inside each block's forward, nothing cached
        assert got["cached"] == [0] * STEPS


@pytest.mark.slow
@pytest.mark.parametrize("variant", SAVED)
def test_fsdp2_prompt_files(distributed, variant):
    folder, results = distributed
    assert (folder / f"{variant}.rank0.safetensors").exists()
    assert not (folder / f"{variant}.rank1.safetensors").exists(), "rank 1 wrote a file"
    trained = build(variant)
    run_steps(trained, *batch(trained))
    # written by the sharded model: whole tensors, loads into one process with the backbone checked
    model = build(variant, seed=5)
    vpt_fast.load_prompts(model, folder / f"{variant}.rank0.safetensors")
    for name, value in vpt_fast.prompt_state_dict(trained).items():
        assert_close(vpt_fast.prompt_state_dict(model)[name], value, atol=1e-6, rtol=1e-4, name=name)
        assert_close(results["files"][variant]["state"][name], value, atol=1e-6, rtol=1e-4, name=name)
    x, _ = batch(model)
    with torch.no_grad():
        assert_close(results["files"][variant]["sharded_to_sharded"], trained.eval()(x), atol=1e-5, rtol=1e-4,
                     name="a sharded model loading a sharded model's file")
        assert_close(results["files"][variant]["unsharded_to_sharded"], build(variant, seed=7).eval()(x),
                     atol=1e-5, rtol=1e-4, name="a sharded model loading one process's file")


@pytest.mark.slow
def test_fsdp2_prompt_bank_mixed_tasks(distributed):
    _, results = distributed
    got = results["bank"]
    assert "add every task first" in got["late_add"]
    models = bank_models()
    bank = vpt_fast.PromptBank(models[0]).train()
    for t, task_model in enumerate(models):
        bank.add(f"task{t}", task_model)
    x, _ = batch(models[0], len(BANK_TASKS))
    expected = bank_step(bank, x, slice(None))
    assert got["present"] == ["task0", "task2"]  # rank 0's half: task1 trained on rank 1 only
    assert got["grads"].keys() == expected["grads"].keys()
    for name, grad in expected["grads"].items():
        assert grad.abs().sum() > 0, name
        assert_close(got["grads"][name], grad, atol=1e-6, rtol=1e-4, name=f"bank: gradient of {name}")
    for name, logits in expected["eval"].items():
        assert_close(got["eval"][name], logits, atol=1e-5, rtol=1e-4, name=f"bank: no-grad logits of {name}")
