"""Prompt K/V cache for shallow ViT (block 0) and Swin, deep and shallow (docs/design.md §8): without
gradients, the norm1 and q/k/v projection of every prompt set that enters a block as parameters are
computed once and reused across batches. Cached logits equal uncached ones on every backend; the
cache follows everything the values depend on (prompt versions, backbone weights, dtype, autocast,
backend, device) and is never used while gradients are needed or torch.compile traces; a
PromptBank's stacked task sets are cached the same way; the cached forward computes fewer FLOPs by
exactly the prompt rows' projection. (Deep ViT's cache is covered in test_serving.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vpt_fast
from utils import prompted_swin, prompted_vit, random_batch, randomize, rel_error
from vpt_fast.bench import count_flops
from vpt_fast.blocks.swin import SwinBlock
from vpt_fast.blocks.vit import ViTBlock
from vpt_fast.prompt_cache import cached_prompt_values

BACKENDS = [b for b in vpt_fast.available_backends() if b != "reference"]
FAMILIES = ["vit-shallow", "swin-deep", "swin-shallow"]
NUM_PROMPTS = 4


def build(family: str, backend: str = "torch", **kwargs):
    """A tiny prompted model of `family` (random trainable state), in eval mode."""
    if family == "vit-shallow":
        return prompted_vit(num_prompts=NUM_PROMPTS, deep=False, backend=backend, **kwargs).eval()
    # 32 px, window 4: an 8x8 grid in 4 windows (the second block shifted), then one 4x4 window
    return prompted_swin(size="w4", num_prompts=NUM_PROMPTS, deep=family == "swin-deep", backend=backend,
                         **kwargs).eval()


def cached_slots(family: str, model) -> int:
    """Blocks whose prompts are parameters: the cache holds one entry for each."""
    return sum(len(stage.blocks) for stage in model.layers) if family == "swin-deep" else 1


@pytest.fixture
def qkv_calls(monkeypatch):
    """Prompt sets (their batch sizes) passed to a block's prompt projection, ViT and Swin."""
    calls = []
    for cls in (ViTBlock, SwinBlock):
        original = cls.prompt_qkv

        def counting(self, prompts, *args, _original=original, **kwargs):
            calls.append(prompts.shape[0])
            return _original(self, prompts, *args, **kwargs)

        monkeypatch.setattr(cls, "prompt_qkv", counting)
    return calls


def uncached(model, x):
    """Logits with gradients enabled: the cache is bypassed and the prompts are projected in the blocks."""
    with torch.enable_grad():
        return model(x).detach()


# -- exactness ---------------------------------------------------------------------------------------


# the Triton interpreter is slow: one layout per family covers its path (the block code is shared)
VIT_CASES = [pytest.param(variant, kwargs, backend, id=f"{variant}{'-project' if kwargs else ''}-{backend}")
             for variant, kwargs in [("cls_token", {}), ("registers", {}), ("avg_pool", {}),
                                     ("layerscale_qknorm", {}), ("cls_token", {"project": 8})]
             for backend in BACKENDS if backend != "triton" or (variant == "cls_token" and not kwargs)]
SWIN_CASES = [pytest.param(family, backend, id=f"{family}-{backend}")
              for family in ("swin-deep", "swin-shallow") for backend in BACKENDS
              if backend != "triton" or family == "swin-deep"]


@pytest.mark.parametrize("variant,kwargs,backend", VIT_CASES)
def test_vit_shallow_cached_equals_uncached(variant, kwargs, backend, qkv_calls):
    model = prompted_vit(variant=variant, num_prompts=NUM_PROMPTS, deep=False, backend=backend, **kwargs).eval()
    x, _ = random_batch(model, 3)
    expected = uncached(model, x)
    assert qkv_calls == [] and model.vpt.kv_cache == {}
    with torch.no_grad():
        first = model(x)
        with torch.inference_mode():
            second = model(x[:2])
        features = model.forward_features(x)
    assert qkv_calls == [1]  # block 0's prompt rows, once
    assert rel_error(first, expected) < 1e-5 and rel_error(second, expected[:2]) < 1e-5
    with torch.enable_grad():
        assert rel_error(features, model.forward_features(x).detach()) < 1e-5


@pytest.mark.parametrize("family,backend", SWIN_CASES)
def test_swin_cached_equals_uncached(family, backend, qkv_calls):
    model = build(family, backend)
    x, _ = random_batch(model, 2)
    expected = uncached(model, x)
    calls = len(qkv_calls)
    with torch.no_grad():
        first, second = model(x), model(x.flip(0))
    # the parameter sets (batch 1) are projected once for both calls; shallow Swin's later blocks
    # project their image-dependent prompt rows (batch 2) in every call
    assert sum(n == 1 for n in qkv_calls[calls:]) == cached_slots(family, model)
    assert len(model.vpt.kv_cache) == cached_slots(family, model)
    assert rel_error(first, expected) < 1e-5 and rel_error(second, expected.flip(0)) < 1e-5
    if backend != "triton":  # forward_features: the last block's prompt outputs are not needed there
        with torch.no_grad():
            features = model.forward_features(x)
        assert sum(n == 1 for n in qkv_calls[calls:]) == cached_slots(family, model)  # same entries
        with torch.enable_grad():
            assert rel_error(features, model.forward_features(x).detach()) < 1e-5


def test_swin_shallow_caches_only_the_first_block(qkv_calls):
    model = build("swin-shallow")
    x, _ = random_batch(model, 2)
    with torch.no_grad():
        model(x)
        model(x)
    # the first block's prompt projection is cached; every later block projects its (image-dependent)
    # prompt rows, batch 2, on every call
    later = sum(len(stage.blocks) for stage in model.layers) - 1
    assert list(model.vpt.kv_cache) == [(0, 0)]
    assert qkv_calls == [1] + [2] * later + [2] * later


# -- never stale -------------------------------------------------------------------------------------


def _optimizer_step(model, tmp_path):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = random_batch(model, 2)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _load_prompts(model, tmp_path):
    other = randomize(copy.deepcopy(model))
    vpt_fast.save_prompts(other, tmp_path / "prompts.safetensors")
    vpt_fast.load_prompts(model, tmp_path / "prompts.safetensors")


def _load_state_dict(model, tmp_path):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in state:
        if name.startswith("vpt.prompts"):
            state[name].normal_()
    model.load_state_dict(state)


def _backbone_norm1(model, tmp_path):
    block = model.blocks[0] if hasattr(model, "blocks") else model.layers[0].blocks[0]
    with torch.no_grad():
        block.norm1.weight.mul_(1.5)


def _qkv_bias(model, tmp_path):
    block = model.blocks[0] if hasattr(model, "blocks") else model.layers[0].blocks[0]
    with torch.no_grad():
        block.attn.qkv.bias.add_(0.5)


CHANGES = {"optimizer_step": _optimizer_step, "load_prompts": _load_prompts, "load_state_dict": _load_state_dict,
           "backbone_norm1": _backbone_norm1, "qkv_bias": _qkv_bias}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_follows_parameter_changes(family, change, tmp_path, qkv_calls):
    model = build(family, project=8 if change == "optimizer_step" else None)
    x, _ = random_batch(model, 2)
    with torch.no_grad():
        before = model(x)
    CHANGES[change](model, tmp_path)
    model.eval()
    calls = len(qkv_calls)
    with torch.no_grad():
        after = model(x)
    cached = cached_slots(family, model)
    # recomputed for every cached block whose inputs changed (only the first for its own weights)
    changed = 1 if change in ("backbone_norm1", "qkv_bias") else cached
    uncached_per_call = 0 if family != "swin-shallow" else sum(len(s.blocks) for s in model.layers) - 1
    assert len(qkv_calls) == calls + changed + uncached_per_call
    assert rel_error(after, uncached(model, x)) < 1e-5
    assert rel_error(after, before) > 1e-4


@pytest.mark.parametrize("family", ["vit-deep", "vit-shallow", "swin-deep"])
def test_cache_is_not_fooled_by_a_reused_address(family):
    """`.data =` keeps the version counter, and the allocator soon hands a freed storage's memory to
    a new tensor: a key on the data pointer would then match and return stale values. Made
    deterministic here with two storages over one Python buffer (the same address, one after the other)."""
    model = prompted_vit(num_prompts=NUM_PROMPTS, deep=True).eval() if family == "vit-deep" else build(family)
    x, _ = random_batch(model, 2)
    prompts = model.vpt.stage_prompts(0)
    memory = bytearray(prompts.numel() * prompts.element_size())

    def storage_over_memory():
        return torch.frombuffer(memory, dtype=prompts.dtype).view(prompts.shape)

    with torch.no_grad():
        prompts.data = storage_over_memory().copy_(prompts)
        model(x)  # cached under the first storage
        address, version = prompts.data_ptr(), prompts._version
        prompts.data = torch.zeros_like(prompts)  # frees the first storage (the memory stays)
        prompts.data = storage_over_memory().normal_()  # a new storage at the same address, new values
        assert (prompts.data_ptr(), prompts._version) == (address, version)
        assert rel_error(model(x), uncached(model, x)) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_follows_dtype_autocast_and_backend(family, qkv_calls):
    model = build(family)
    x, _ = random_batch(model, 2)
    slots = cached_slots(family, model)

    def cached_calls(run) -> int:
        """Prompt projections of cached slots during `run` (batch-1 sets: the parameters)."""
        calls = len(qkv_calls)
        run()
        return sum(1 for batch in qkv_calls[calls:] if batch == 1)

    with torch.no_grad():
        assert cached_calls(lambda: model(x)) == slots
        assert cached_calls(lambda: model(x)) == 0
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                assert cached_calls(lambda: model(x)) == slots, dtype  # each autocast dtype recomputes
                low = model(x)
            with torch.autocast("cpu", dtype=dtype):
                assert rel_error(low, uncached(model, x)) < 2e-2  # same low-precision math
        assert cached_calls(lambda: model(x)) == slots  # back to fp32
        model.double()
        assert cached_calls(lambda: model(x.double())) == slots
        out = model(x.double())
        assert out.dtype == torch.float64 and rel_error(out, uncached(model, x.double())) < 1e-10
        model.float()
        fp32 = model(x)
        vpt_fast.set_backend(model, "cuda" if "cuda" in BACKENDS else "triton")
        assert cached_calls(lambda: model(x)) == slots
        assert rel_error(model(x), fp32) < 1e-5
        assert rel_error(model(x), uncached(model, x)) < 1e-5


def test_cache_key_includes_the_device():
    """Only a CPU here: the helper's key is checked directly with a second device name (the values
    are computed on the CPU either way; only the keying is under test)."""
    model = build("vit-shallow")
    computed = []

    def compute():
        computed.append(1)
        return len(computed)

    args = (model.vpt, "probe", [model.blocks[0].norm1], "torch")
    with torch.no_grad():
        assert cached_prompt_values(*args, torch.device("cpu"), compute) == 1
        assert cached_prompt_values(*args, torch.device("cpu"), compute) == 1
        assert cached_prompt_values(*args, torch.device("cuda", 0), compute) == 2
        assert cached_prompt_values(*args, torch.device("cuda", 1), compute) == 3
        assert cached_prompt_values(*args, torch.device("cpu"), compute) == 4
        assert cached_prompt_values(*args, torch.device("cpu"), compute, variant="other") == 5
    assert cached_prompt_values(*args, torch.device("cpu"), compute) is None  # gradients enabled: no cache


@pytest.mark.parametrize("family", FAMILIES)
def test_no_cache_when_gradients_are_needed(family):
    """Training mode or not, a forward with gradients projects the prompts in the graph (the cached,
    detached values would cut the prompts' gradient through norm1 and the projection) and gives the
    prompts exactly the gradients of a model that never cached; with prompt dropout active nothing
    is cached."""
    model = build(family)
    fresh = copy.deepcopy(model)
    x, y = random_batch(model, 2)
    with torch.no_grad():
        model(x)
    assert model.vpt.kv_cache
    for mode in (False, True):
        model.train(mode)
        fresh.train(mode)
        grads = []
        for m in (model, fresh):
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
            grads.append([p.grad for p in m.vpt.parameters()])
        for got, expected in zip(*grads):
            assert got is not None and torch.equal(got, expected)
    dropped = build(family, dropout=0.5).train()
    with torch.no_grad():
        a, b = dropped(x), dropped(x)
    assert not torch.equal(a, b) and dropped.vpt.kv_cache == {}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_no_cache_while_compiling(family):
    """torch.compile traces the prompt projection into the graph (filling or reading the cache
    there would bake values into it): the compiled model follows in-place prompt changes."""
    model = build(family)
    x, _ = random_batch(model, 2)
    with torch.no_grad():
        eager = model(x)
        entries = dict(model.vpt.kv_cache)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert rel_error(compiled(x), eager) < 1e-6
        assert model.vpt.kv_cache == entries  # neither read nor refilled while tracing
        for p in model.vpt.parameters():
            p.mul_(-1.0)
        assert rel_error(compiled(x), uncached(model, x)) < 1e-5
    torch._dynamo.reset()


# -- PromptBank ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bank_caches_stacked_task_sets(family, qkv_calls):
    torch.manual_seed(0)
    base = build(family)
    models = [randomize(copy.deepcopy(base)).eval() for _ in range(3)]
    bank = vpt_fast.PromptBank(models[0]).eval()
    for t, model in enumerate(models):
        bank.add(f"task{t}", model)
    x, _ = random_batch(models[0], 4)
    tasks = ["task2", "task0", "task2", "task1"]
    calls = len(qkv_calls)
    with torch.no_grad():
        first = bank(x, tasks)
        second = bank(x.flip(0), tasks[::-1])
    stacked = [n for n in qkv_calls[calls:] if n == 3]
    assert len(stacked) == cached_slots(family, models[0])  # all tasks' sets once per cached block
    assert len(bank.kv_cache) == cached_slots(family, models[0])
    for t, model in enumerate(models):
        rows = [i for i, name in enumerate(tasks) if name == f"task{t}"]
        assert rel_error(first[f"task{t}"], uncached(model, x[rows])) < 1e-5
        assert rel_error(second[f"task{t}"], first[f"task{t}"].flip(0)) < 1e-5
    with torch.no_grad():
        bank.tasks["task1"].vpt.stage_prompts(0).mul_(-1.0)  # one task changes: the table is recomputed
        after = bank(x, tasks)
    models[1].vpt.load_state_dict(bank.tasks["task1"].vpt.state_dict())
    assert rel_error(after["task1"], first["task1"]) > 1e-4
    assert rel_error(after["task1"], uncached(models[1], x[[3]])) < 1e-5
    assert rel_error(after["task2"], first["task2"]) < 1e-6


# -- FLOPs ---------------------------------------------------------------------------------------------


def prompt_projection_flops(family: str, model) -> int:
    """Matmul FLOPs of the prompt rows' projection that the cache saves, at batch 1: shallow ViT's
    q/k/v of P rows in block 0; Swin's K/V of P rows in every cached block, plus the queries where
    the prompt outputs are needed (shallow: block 0; deep: the last block)."""
    if family == "vit-shallow":
        dim = model.embed_dim
        return 2 * NUM_PROMPTS * dim * 3 * dim
    blocks = [b for stage in model.layers for b in stage.blocks]
    cached = blocks if family == "swin-deep" else blocks[:1]
    with_queries = blocks[-1] if family == "swin-deep" else blocks[0]
    return sum(2 * NUM_PROMPTS * b.dim * (3 if b is with_queries else 2) * b.dim for b in cached)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_inference_saves_the_prompt_projection_flops(family):
    model = build(family)
    x, _ = random_batch(model, 1)
    with torch.enable_grad():
        without_cache = count_flops(lambda: model(x))
    with torch.inference_mode():
        model(x)  # fills the cache
        with_cache = count_flops(lambda: model(x))
    assert without_cache - with_cache == prompt_projection_flops(family, model)
