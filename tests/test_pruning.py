"""Last-block query pruning (docs/design.md §2): with global_pool='token' the head reads the class
token only, so the last block computes keys/values for every row but queries, attention rows,
projection and MLP for the class token alone. Exact FLOP counts per block, equality with the reference
backend in training and inference, and every other pool left unpruned."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vpt_fast
from utils import prompted_vit, random_batch, rel_error
from vpt_fast.bench import flop_mapping

B, D, H, MLP_RATIO = 2, 48, 3, 4  # tiny_vit: 32 px, patch 8 -> 16 patches + class token


def block_flops(batch: int, query_rows: int, rows: int, num_prompts: int) -> int:
    """Matmul FLOPs of one prompt-aware ViT block, deep prompts shared by the batch."""
    hd = D // H
    q = 2 * batch * query_rows * D * D
    kv = 2 * batch * rows * D * 2 * D
    prompt_kv = 2 * num_prompts * D * 2 * D
    attention = 2 * (2 * batch * H * query_rows * (rows + num_prompts) * hd)
    proj = 2 * batch * query_rows * D * D
    mlp = 2 * (2 * batch * query_rows * D * MLP_RATIO * D)
    return q + kv + prompt_kv + attention + proj + mlp


def per_block_flops(model, x) -> list[int]:
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        model(x)
    counts = counter.get_flop_counts()
    return [sum(counts[f"{type(model).__name__}.blocks.{i}"].values()) for i in range(len(model.blocks))]


def test_last_block_computes_the_class_token_only():
    model = prompted_vit(num_prompts=4, deep=True, backend="torch").eval()
    x, _ = random_batch(model, B)
    # without gradients the prompt K/V come from the model's cache, outside the blocks
    prompt_kv = 2 * 4 * D * 2 * D
    full, pruned = block_flops(B, 17, 17, 4) - prompt_kv, block_flops(B, 1, 17, 4) - prompt_kv
    assert per_block_flops(model, x) == [full, full, pruned]
    assert pruned < 0.25 * full


@pytest.mark.parametrize("variant", ["avg_pool", "registers_avg"])
def test_other_pools_keep_every_row(variant):
    model = prompted_vit(variant=variant, num_prompts=4, deep=True, backend="torch").eval()
    x, _ = random_batch(model, B)
    flops = per_block_flops(model, x)
    assert flops[-1] == flops[0]


@pytest.mark.parametrize("backend", [b for b in vpt_fast.available_backends() if b != "reference"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("variant", ["cls_token", "registers", "layerscale_qknorm"])
def test_pruned_inference_matches_reference(variant, deep, backend):
    model = prompted_vit(variant=variant, num_prompts=4, deep=deep).eval()
    x, _ = random_batch(model, 3)
    vpt_fast.set_backend(model, "reference")
    with torch.inference_mode():
        expected = model(x)
        vpt_fast.set_backend(model, backend)
        pruned = model(x)
        unpruned = model.forward_head(model.forward_features(x))
    assert rel_error(pruned, expected) < 1e-5
    assert rel_error(pruned, unpruned) < 1e-5


@pytest.mark.parametrize("recompute", ["none", "mlp", "block"])
def test_pruned_training_gradients_match_reference(recompute):
    model = prompted_vit(num_prompts=4, deep=True, project=8, dropout=0.0, recompute=recompute).train()
    x, y = random_batch(model, 3)
    results = {}
    for backend in ("reference", "torch"):
        vpt_fast.set_backend(model, backend, recompute)
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results[backend] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for got, want in zip(results["torch"], results["reference"]):
        assert rel_error(got, want) < 1e-5


def test_query_rows_is_checked():
    model = prompted_vit(num_prompts=4, backend="torch")
    x = torch.randn(2, 17, D)
    with pytest.raises(ValueError, match="query_rows"):
        model.blocks[0](x, query_rows=0)
    assert model.blocks[0](x, query_rows=3).shape == (2, 3, D)


# -- deep VPT's first block: no input gradient below the prompts ----------------------------------------


def _training_flops_per_block(model, x, y):
    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    counts = counter.get_flop_counts()
    return [counts[f"{type(model).__name__}.blocks.{i}"] for i in range(len(model.blocks))]


def test_first_block_backward_computes_only_the_prompt_columns():
    model = prompted_vit(num_prompts=4, deep=True, backend="torch").train()
    x, y = random_batch(model, B)
    first, second = _training_flops_per_block(model, x, y)[:2]
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    assert flash_bwd in second and flash_bwd not in first  # no dQ, no image-row dK/dV
    # the prompt columns' backward (P of N + P keys) is a few batched GEMMs, far below the full one
    mm, bmm = torch.ops.aten.mm, torch.ops.aten.bmm
    assert first.get(bmm, 0) < 0.2 * second[flash_bwd]
    assert first[mm] < second[mm]  # and no qkv input-gradient GEMM for the image rows


@pytest.mark.parametrize("backend", [b for b in vpt_fast.available_backends() if b in ("torch", "cuda")])
def test_unfrozen_embeddings_get_their_full_gradient(backend):
    model = prompted_vit(num_prompts=4, deep=True).train()
    model.patch_embed.proj.weight.requires_grad_(True)
    model.pos_embed.requires_grad_(True)
    x, y = random_batch(model, 3)
    grads = {}
    for name in ("reference", backend):
        vpt_fast.set_backend(model, name)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert "patch_embed.proj.weight" in grads[backend] and "pos_embed" in grads[backend]
    for n, g in grads["reference"].items():
        assert rel_error(grads[backend][n], g) < 1e-5, n
