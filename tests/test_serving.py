"""Many tasks on one backbone (docs/design.md §8): the prompt K/V cache never returns a stale value,
a PromptBank's mixed batch equals each task's own prompted model, and mixed-batch training gives each
task the gradients separate per-task steps would."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import vpt_fast
from utils import random_batch, randomize, rel_error, tiny_swin, tiny_vit
from vpt_fast.blocks.vit import ViTBlock
from vpt_fast.models.vit import PromptedVisionTransformer

BACKENDS = [b for b in vpt_fast.available_backends()]


@pytest.fixture
def kv_calls(monkeypatch):
    calls = []
    original = ViTBlock.prompt_kv

    def counting(self, prompts, backend):
        calls.append(prompts.shape[0])
        return original(self, prompts, backend)

    monkeypatch.setattr(ViTBlock, "prompt_kv", counting)
    return calls


def _uncached(model, x):
    with torch.enable_grad():
        return model(x).detach()


# -- prompt K/V cache -------------------------------------------------------------------------------


def test_cache_computes_prompt_kv_once(kv_calls):
    model = randomize(vpt_fast.prompt(tiny_vit(), num_prompts=4, backend="torch")).eval()
    x, _ = random_batch(model, 2)
    with torch.no_grad():
        first = model(x)
        assert len(kv_calls) == 3
        for _ in range(3):
            assert torch.equal(model(x), first)
    with torch.inference_mode():
        assert torch.equal(model(x), first)
    assert len(kv_calls) == 3  # computed once, reused across batches
    assert rel_error(first, _uncached(model, x)) < 1e-6


def _changes():
    def step(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        x, y = random_batch(model, 2)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def load_prompts(model, tmp_path):
        other = copy.deepcopy(model)
        randomize(other)
        vpt_fast.save_prompts(other, tmp_path / "p.safetensors")
        vpt_fast.load_prompts(model, tmp_path / "p.safetensors")

    def load_state_dict(model):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["vpt.prompts"].normal_()
        model.load_state_dict(state)

    def new_backbone_weights(model):
        with torch.no_grad():
            model.blocks[1].attn.qkv.weight.mul_(1.5)

    def data_assignment(model):
        model.vpt.prompts.data = torch.randn_like(model.vpt.prompts)

    def fused_optimizer_step(model):  # updates without bumping the parameters' version counters
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5, fused=True)
        x, y = random_batch(model, 2)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def manual_update_through_data(model):  # research-code SGD: invisible to version counters
        x, y = random_batch(model, 2)
        F.cross_entropy(model(x), y).backward()
        for p in model.parameters():
            if p.grad is not None:
                p.data.add_(p.grad, alpha=-0.5)

    def backend_switch(model):
        vpt_fast.set_backend(model, "cuda" if "cuda" in BACKENDS else "triton")

    return {"optimizer_step": lambda m, p: step(m), "load_prompts": load_prompts,
            "load_state_dict": lambda m, p: load_state_dict(m),
            "backbone_weights": lambda m, p: new_backbone_weights(m),
            "data_assignment": lambda m, p: data_assignment(m), "backend": lambda m, p: backend_switch(m),
            "fused_optimizer_step": lambda m, p: fused_optimizer_step(m),
            "manual_update_through_data": lambda m, p: manual_update_through_data(m)}


@pytest.mark.parametrize("change", list(_changes()))
def test_cache_is_never_stale(change, tmp_path, kv_calls):
    model = randomize(vpt_fast.prompt(tiny_vit(), num_prompts=4, backend="torch", project=8)).eval()
    x, _ = random_batch(model, 2)
    with torch.no_grad():
        before = model(x)
    _changes()[change](model, tmp_path)
    model.eval()
    calls = len(kv_calls)
    with torch.no_grad():
        after = model(x)
    # recomputed for every block whose inputs changed (only block 1 for its own weights)
    assert len(kv_calls) == calls + (1 if change == "backbone_weights" else 3)
    assert rel_error(after, _uncached(model, x)) < 1e-5
    if change != "backend":
        assert rel_error(after, before) > 1e-4


def test_clear_caches_after_a_data_write_outside_training(kv_calls):
    """A `.data` write with no training step around it is the one update the keys cannot see (no
    version bump, no optimizer step, no forward with gradients): `clear_caches` makes the next
    forward recompute, for a prompted ViT and a PromptBank over it."""
    model = randomize(vpt_fast.prompt(tiny_vit(), num_prompts=4, backend="torch")).eval()
    bank = vpt_fast.PromptBank(model).eval()
    bank.add("a", copy.deepcopy(model))
    x, _ = random_batch(model, 2)
    with torch.no_grad():
        model(x)
        bank(x, ["a", "a"])
    model.vpt.prompts.data.copy_(torch.randn_like(model.vpt.prompts))
    calls = len(kv_calls)
    assert vpt_fast.clear_caches(model) is model and vpt_fast.clear_caches(bank) is bank
    assert model.vpt.kv_cache == {} and bank.kv_cache == {}
    with torch.no_grad():
        after = model(x)
    assert len(kv_calls) == calls + 3
    assert rel_error(after, _uncached(model, x)) < 1e-5


def test_cache_follows_dtype_and_autocast(kv_calls):
    model = randomize(vpt_fast.prompt(tiny_vit(), num_prompts=4, backend="torch")).eval()
    x, _ = random_batch(model, 2)
    with torch.no_grad():
        model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        assert len(kv_calls) == 6
        model.double()
        assert model(x.double()).dtype == torch.float64
    assert len(kv_calls) == 9
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_error(low, _uncached(model.float(), x)) < 2e-2


def test_no_cache_while_prompt_dropout_draws(kv_calls):
    model = randomize(vpt_fast.prompt(tiny_vit(), num_prompts=4, dropout=0.3, backend="torch")).train()
    x, _ = random_batch(model, 2)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.equal(a, b) and model.vpt.kv_cache == {}


def test_cache_is_not_pickled():
    model = randomize(vpt_fast.prompt(tiny_vit(), num_prompts=4, backend="torch")).eval()
    x, _ = random_batch(model, 2)
    with torch.no_grad():
        expected = model(x)
    assert model.vpt.kv_cache
    clone = copy.deepcopy(model)
    assert "_kv_cache" not in clone.vpt.__dict__
    with torch.no_grad():
        assert torch.equal(clone(x), expected)


def test_inference_flops_with_cache_near_bare_backbone():
    from vpt_fast.bench import count_flops
    bare = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10).eval()
    model = vpt_fast.prompt(copy.deepcopy(bare), num_prompts=50, deep=True, backend="torch").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        model(x)  # fills the cache
        ratio = count_flops(lambda: model(x)) / count_flops(lambda: bare(x))
    assert ratio <= 1.03, ratio


# -- PromptBank -------------------------------------------------------------------------------------


def _task_models(factory, count: int, **prompt_kwargs):
    torch.manual_seed(0)
    base = factory()
    models = []
    for _ in range(count):
        model = randomize(vpt_fast.prompt(copy.deepcopy(base), **prompt_kwargs))
        models.append(model.eval())
    return models


def _mixed(names, batch):
    return [names[i % len(names)] for i in (0, 2, 1, 1, 0, 2, 1)[:batch]]


CASES = [pytest.param(family, deep, backend,
                      marks=[pytest.mark.slow] if backend == "triton" and (family, deep) != ("vit", True) else [],
                      id=f"{family}-{'deep' if deep else 'shallow'}-{backend}")
         for family, deep in [("vit", True), ("vit", False), ("swin", True)] for backend in BACKENDS]


@pytest.mark.parametrize("family,deep,backend", CASES)  # triton runs in its (slow) CPU interpreter here
def test_bank_equals_each_task_model(family, deep, backend):
    factory = tiny_vit if family == "vit" else (lambda: tiny_swin("w4", depths=(1, 1)))
    models = _task_models(factory, 3, num_prompts=3, deep=deep, backend=backend)
    bank = vpt_fast.PromptBank(models[0]).eval()
    for t, model in enumerate(models):
        bank.add(f"task{t}", model)
    x, _ = random_batch(models[0], 5)
    tasks = _mixed(bank.task_names, 5)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = bank(x, tasks)
            assert set(out) == set(tasks)
            for t, model in enumerate(models):
                rows = [i for i, name in enumerate(tasks) if name == f"task{t}"]
                assert rel_error(out[f"task{t}"], model(x[rows])) < 1e-5, (t, grad)
    ids = torch.tensor([bank.task_names.index(n) for n in tasks])
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(bank(x, ids).values(), bank(x, tasks).values()))


def test_bank_mixed_training_equals_per_task_steps():
    models = _task_models(tiny_vit, 3, num_prompts=3, deep=True, project=6, backend="torch")
    bank = vpt_fast.PromptBank(models[0]).train()
    for t, model in enumerate(models):
        bank.add(f"task{t}", model)
    x, _ = random_batch(models[0], 6)
    tasks = ["task0", "task2", "task0", "task1", "task2", "task0"]
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    out = bank(x, tasks)
    loss = sum(F.cross_entropy(out[n], labels[[i for i, t in enumerate(tasks) if t == n]]) for n in out)
    loss.backward()
    for t, model in enumerate(models):
        rows = [i for i, name in enumerate(tasks) if name == f"task{t}"]
        model.train().zero_grad()
        F.cross_entropy(model(x[rows]), labels[rows]).backward()
        ours = bank.tasks[f"task{t}"].state_tensors()
        expected = dict(model.vpt.state_tensors(), **{f"head.{n}": p for n, p in model.head.named_parameters()})
        assert set(expected) == set(ours)
        for name in expected:
            assert rel_error(ours[name].grad, expected[name].grad) < 1e-5, (t, name)
    absent = vpt_fast.PromptBank(models[0])
    absent.add("a", models[0])
    absent.add("b", models[1])
    absent(x[:2], ["a", "a"])["a"].sum().backward()
    assert all(p.grad is None for p in absent.tasks["b"].parameters())  # only present tasks train


def test_bank_parameters_are_the_tasks_and_the_backbone_is_shared():
    models = _task_models(tiny_vit, 2, num_prompts=3, backend="torch")
    bank = vpt_fast.PromptBank(models[0])
    bank.add("a", models[0])
    bank.add("b", vpt_fast.prompt_state_dict(models[1]), metadata=vpt_fast.io.metadata(models[1]))
    params = list(bank.parameters())
    assert len(params) == 2 * 3 and all(p.requires_grad for p in params)
    assert set(bank.prompt_state_dict("b")) == set(vpt_fast.prompt_state_dict(models[1]))
    assert all(torch.equal(v, vpt_fast.prompt_state_dict(models[1])[k]) for k, v in bank.prompt_state_dict("b").items())


def test_bank_heads_may_differ_in_classes_and_files_load(tmp_path):
    models = _task_models(tiny_vit, 1, num_prompts=3, backend="torch")
    other = copy.deepcopy(models[0])  # the same backbone, a 9-class head
    other.reset_classifier(9)
    vpt_fast.save_prompts(randomize(other), tmp_path / "nine.safetensors")
    bank = vpt_fast.PromptBank(models[0]).eval()
    bank.add("five", models[0])
    bank.add("nine", tmp_path / "nine.safetensors")
    x, _ = random_batch(models[0], 3)
    with torch.no_grad():
        out = bank(x, ["nine", "five", "nine"])
    assert out["nine"].shape == (2, 9) and out["five"].shape == (1, 5)


@pytest.mark.parametrize("kwargs,field", [({"num_prompts": 4}, "num_prompts"), ({"deep": False}, "deep"),
                                          ({"project": 8}, "project")])
def test_bank_refuses_mismatched_tasks_naming_the_field(kwargs, field, tmp_path):
    bank = vpt_fast.PromptBank(vpt_fast.prompt(tiny_vit(), num_prompts=3))
    other = vpt_fast.prompt(tiny_vit(), **{"num_prompts": 3, **kwargs})
    with pytest.raises(ValueError, match=field):
        bank.add("model", other)
    vpt_fast.save_prompts(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=field):
        bank.add("file", tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not match"), pytest.warns(UserWarning, match="without metadata"):
        bank.add("state", vpt_fast.prompt_state_dict(other))
    assert bank.task_names == []


def test_bank_refuses_another_width_and_unknown_tasks():
    bank = vpt_fast.PromptBank(vpt_fast.prompt(tiny_vit(), num_prompts=3))
    with pytest.raises(ValueError, match="embed_dim"):
        bank.add("wide", vpt_fast.prompt(tiny_vit(embed_dim=96), num_prompts=3))
    bank.add("a", bank.model)
    x, _ = random_batch(bank.model, 2)
    with pytest.raises(KeyError, match="nope"):
        bank(x, ["a", "nope"])
    with pytest.raises(ValueError, match="one task per image"):
        bank(x, ["a"])
    with pytest.raises(ValueError, match="task ids"):
        bank(x, torch.tensor([0, 3]))


def test_bank_caches_the_task_table_without_gradients(kv_calls):
    models = _task_models(tiny_vit, 2, num_prompts=3, backend="torch")
    bank = vpt_fast.PromptBank(models[0]).eval()
    bank.add("a", models[0])
    bank.add("b", models[1])
    x, _ = random_batch(models[0], 4)
    with torch.no_grad():
        first = bank(x, ["a", "b", "b", "a"])
        second = bank(x[[3, 1, 2, 0]], ["a", "b", "b", "a"])
    assert kv_calls == [2, 2, 2]  # both tasks' sets, once per block
    assert rel_error(first["a"], second["a"].flip(0)) < 1e-6
    assert isinstance(bank.model, PromptedVisionTransformer)


@pytest.mark.slow
def test_inference_compiles_fullgraph_and_exports():
    models = _task_models(tiny_vit, 2, num_prompts=3, deep=True, backend="torch")
    bank = vpt_fast.PromptBank(models[0]).eval()
    bank.add("a", models[0])
    seven = copy.deepcopy(models[0])
    seven.reset_classifier(7)
    bank.add("b", randomize(seven))  # same backbone, another head size
    x, _ = random_batch(models[0], 3)
    ids = torch.tensor([1, 0, 1])
    with torch.no_grad():
        expected = bank(x, ["b", "a", "b"])
        padded = bank.logits(x, ids)
        assert torch.equal(padded[1, 5:], torch.full((2,), float("-inf")))
        assert rel_error(padded[[0, 2]], expected["b"]) < 1e-6 and rel_error(padded[1, :5], expected["a"][0]) < 1e-6
        # no graph break anywhere on the inference paths (dynamo's eager backend: tracing only)
        torch._dynamo.reset()
        model_out = torch.compile(models[0], backend="eager", fullgraph=True)(x)
        assert rel_error(model_out, models[0](x)) < 1e-6
        compiled = torch.compile(bank.logits, backend="eager", fullgraph=True)(x, ids)
        assert _padded_close(compiled, padded)
    exported = torch.export.export(models[0], (x,))
    assert rel_error(exported.module()(x), models[0](x)) < 1e-6
    exported_bank = torch.export.export(_Logits(bank), (x, ids))
    assert _padded_close(exported_bank.module()(x, ids), padded)


def _padded_close(a, b) -> bool:
    finite = torch.isfinite(b)
    return torch.equal(torch.isfinite(a), finite) and rel_error(a[finite], b[finite]) < 1e-6


class _Logits(torch.nn.Module):
    def __init__(self, bank):
        super().__init__()
        self.bank = bank

    def forward(self, x, ids):
        return self.bank.logits(x, ids)


def test_bank_refuses_a_task_model_with_another_backbone():
    """Same architecture, other backbone weights: the bank would run the task on its own backbone
    and return logits its model never gives, so `add` refuses, naming a differing parameter; a copy
    of the bank's backbone in another dtype is accepted."""
    torch.manual_seed(0)
    base = tiny_vit()
    bank = vpt_fast.PromptBank(vpt_fast.prompt(copy.deepcopy(base), num_prompts=3))
    other = tiny_vit()  # fresh random weights
    with pytest.raises(ValueError, match="another backbone: .* holds other values"):
        bank.add("other", vpt_fast.prompt(other, num_prompts=3))
    bank.add("same", vpt_fast.prompt(copy.deepcopy(base), num_prompts=3).double())
    assert bank.task_names == ["same"]


def test_bank_starts_in_the_models_mode():
    model = vpt_fast.prompt(tiny_vit(), num_prompts=3)
    assert not vpt_fast.PromptBank(model.eval()).training
    bank = vpt_fast.PromptBank(model.train())
    assert bank.training and model.training
