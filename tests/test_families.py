"""New backbone families for `vpt_fast.prompt()` (timm `Eva`: DINOv3, EVA-02, PE-core, RoPE ViTs; timm
`VisionTransformer`: SigLIP with 'map' pooling, AIMv2 with RmsNorm + SwiGLU) against an independent
release-style reference (docs/design.md §1) that runs timm's own, unmodified modules.

The reference (`released_logits`) imports nothing from vpt_fast. On its own deep copy of the UNPROMPTED
timm model it runs timm's patch_embed, position embedding (Eva: `_pos_embed` -> (x, rot_pos_embed), which
also applies pos_drop/patch_drop; ViT: `_pos_embed` then `patch_drop`), `norm_pre`, and inserts P prompt
rows after all prefix tokens (class + register tokens), before the patches: `[prefix, prompts, patches]`.
Prompts get no absolute position embedding and no rotary embedding: timm's Eva attention applies RoPE to
rows `num_prefix_tokens:` only, so the reference sets every block's `attn.num_prefix_tokens` to
`num_prefix_tokens + P` (the rope split moves by P) while it runs, and puts it back afterwards.
Shallow: set 0 is inserted once before block 0; deep: before every block i the prompt rows are replaced
by set i. RoPE 'mixed' passes `rot_pos_embed[i]` to block i, as `Eva.forward_features` does. After the
last block the prompt rows are dropped, then timm's final `norm` and timm's own `forward_head` ('token':
class token, 'avg': patch tokens, 'map': attention pool over prefix + patch rows; fc_norm; head).

Self-tests of the reference: without prompts it is timm's own forward (1e-6); shallow prompts equal timm's
own model with P extra register tokens holding the prompts (zero position embedding at their rows), which
is what timm itself does with extra prefix tokens (its attention's rope split is `num_prefix_tokens`);
prompts change the output, and not moving the rope split changes it too (the split is tested).

The matrix (family x deep/shallow x pools x backends), the projection and PromptBank tests fail until
`prompt()` accepts these families. `test_out_of_scope_is_refused` pins what stays out (MRoPE, BEiT,
NaFlexVit; adjust it there if scope changes); timm's train-time RoPE coordinate augmentation must be
refused by name or be inert (the backbone stays in eval mode).
"""
from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from torch import Tensor, nn

import vpt_fast
from utils import assert_close

NUM_PROMPTS = 3
SMALL = dict(depth=2, embed_dim=64, num_heads=4, num_classes=5)


@dataclass(frozen=True)
class Family:
    model: str              # timm model name
    kwargs: tuple           # extra create_model kwargs (besides SMALL), as sorted items
    pools: tuple[str, ...]  # the model's default pool first, then 'token' (class token) / 'avg' (patches)


def _family(model: str, pools: tuple[str, ...], **kwargs) -> Family:
    return Family(model, tuple(sorted(kwargs.items())), pools)


FAMILIES = {
    # Eva, rope 'dinov3' (rotate-half), cls + 4 register tokens, LayerScale, no abs. pos. embed,
    # dynamic_img_size (NHWC patch_embed, flattened in _pos_embed), avg pool
    "dinov3": _family("vit_small_patch16_dinov3", ("avg", "token"), img_size=64),
    # Eva, rope 'cat' with ref_feat_shape, abs. pos. embed incl. class token, GluMlp SwiGLU
    "eva02": _family("eva02_small_patch14_224", ("avg", "token"), img_size=56),
    # Eva, SwiGLU with an inner norm (scale_mlp)
    "eva02_scale_mlp": _family("eva02_small_patch14_224", ("avg", "token"), img_size=56, scale_mlp=True),
    # Eva, AttentionRope (attn_type='rope'), norm_pre, 'map' attention pool
    "pe_core": _family("vit_pe_core_small_patch16_384", ("map", "token", "avg"), img_size=64),
    # Eva, no class token, 1 register token
    "rope_reg1_gap": _family("vit_medium_patch16_rope_reg1_gap_256", ("avg", "avgmax"), img_size=64),
    # Eva, rope 'mixed': per-block frequencies, rot_pos_embed[i] goes to block i
    "rope_mixed": _family("vit_base_patch16_rope_mixed_224", ("token", "avg"), img_size=64),
    # VisionTransformer, no class token, 'map' AttentionPoolLatent
    "siglip": _family("vit_base_patch16_siglip_224", ("map", "avg"), img_size=64),
    # VisionTransformer, RmsNorm, SwiGLU, avg pool
    "aimv2": _family("aimv2_large_patch14_224", ("avg", "max"), img_size=56),
}
FAMILY_POOLS = [(f, p) for f, fam in FAMILIES.items() for p in fam.pools]
ROPE_FAMILIES = [f for f in FAMILIES if FAMILIES[f].model not in
                 ("vit_base_patch16_siglip_224", "aimv2_large_patch14_224")]


def build(family: str, pool: Optional[str] = None, seed: int = 0, **overrides) -> nn.Module:
    """A small random-weight timm model of `family` with global pool `pool` (None: the default)."""
    fam = FAMILIES[family]
    kwargs = {**SMALL, **dict(fam.kwargs), **overrides}
    if pool is not None and pool != fam.pools[0]:
        kwargs["global_pool"] = pool
    torch.manual_seed(seed)
    return _perturb(timm.create_model(fam.model, pretrained=False, **kwargs)).eval()


def _perturb(model: nn.Module) -> nn.Module:
    """Weights far from timm's init, so that every path matters: LayerScale gammas (DINOv3: 1e-5) in
    [0.5, 1], norm weights 1 + N(0, 0.1), biases N(0, 0.1), matrices N(0, 1/fan_in) (attention far from
    uniform, so RoPE shows), tokens and position embeddings N(0, 0.5). RoPE frequencies stay as built."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("rope."):
                continue
            if name.split(".")[-1] in ("pos_embed", "cls_token", "reg_token", "latent"):
                param.normal_(0, 0.5)
            elif param.ndim >= 2:
                param.normal_(0, param[0].numel() ** -0.5)
            elif "gamma" in name:
                param.uniform_(0.5, 1.0)
            elif name.endswith("weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0, 0.1)
    return model


def images(model: nn.Module, batch: int = 2, seed: int = 2) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *model.patch_embed.img_size, generator=g)
    return x, torch.randint(0, model.num_classes, (batch,), generator=g)


# -- the independent release-style reference --------------------------------------------------------


def released_logits(model: nn.Module, prompt_rows: Optional[Callable[[int], Tensor]], num_sets: int,
                    x: Tensor, move_rope_split: bool = True) -> Tensor:
    """Release-style VPT on timm's unmodified `model` (its own copy: the rope split is changed while it
    runs). `prompt_rows(i)` gives set i as (P, D) (already projected); None runs without prompts.
    `num_sets`: 1 shallow, depth deep. `move_rope_split=False` is only for the self-test."""
    eva = isinstance(model, Eva)
    x = model.patch_embed(x)
    if eva:
        x, rope = model._pos_embed(x)  # pos_drop and patch_drop are inside
    else:
        x, rope = model.patch_drop(model._pos_embed(x)), None
    x = model.norm_pre(x)
    prefix = model.num_prefix_tokens
    rows = [prompt_rows(i) for i in range(num_sets)] if prompt_rows is not None else []
    p = rows[0].shape[0] if rows else 0
    batch = x.shape[0]
    attns = [blk.attn for blk in model.blocks] if eva else []
    saved = [a.num_prefix_tokens for a in attns]
    try:
        if move_rope_split:
            for a in attns:
                a.num_prefix_tokens = prefix + p  # timm's attention rotates only rows prefix + P onwards
        for i, blk in enumerate(model.blocks):
            if rows and i == 0:
                x = torch.cat([x[:, :prefix], rows[0].expand(batch, -1, -1), x[:, prefix:]], dim=1)
            elif rows and num_sets > 1:
                x = torch.cat([x[:, :prefix], rows[i].expand(batch, -1, -1), x[:, prefix + p:]], dim=1)
            if eva:
                x = blk(x, rope=rope[i] if (model.rope_mixed and rope is not None) else rope)
            else:
                x = blk(x)
    finally:
        for a, n in zip(attns, saved):
            a.num_prefix_tokens = n
    x = torch.cat([x[:, :prefix], x[:, prefix + p:]], dim=1)
    return model.forward_head(model.norm(x))


@dataclass
class Reference:
    """A reference run: the unprompted base model, the trainable values to load into the prompted model
    (named as the prompted model names them), logits and gradients of every one of them."""
    base: nn.Module
    state: dict[str, Tensor]
    x: Tensor
    y: Tensor
    logits: Tensor
    grads: dict[str, Tensor]


@functools.lru_cache(maxsize=None)
def reference(family: str, pool: str, deep: bool, project: Optional[int] = None) -> Reference:
    base = build(family, pool)
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    num_sets = len(model.blocks) if deep else 1
    prompts = nn.Parameter(torch.randn(num_sets, NUM_PROMPTS, project or model.embed_dim) * 0.5)
    proj = nn.Linear(project, model.embed_dim) if project else None
    with torch.no_grad():
        for param in model.head.parameters():
            param.normal_(0, 0.5)
        if proj is not None:
            for param in proj.parameters():
                param.normal_(0, 0.5)

    def rows(i):
        return prompts[i] if proj is None else proj(prompts[i])

    x, y = images(model)
    named = {"vpt.prompts": prompts}
    if proj is not None:
        named.update({f"vpt.proj.{n}": q for n, q in proj.named_parameters()})
    named.update(model.named_parameters())
    for param in named.values():
        param.requires_grad_(True)
    logits = released_logits(model, rows, num_sets, x)
    F.cross_entropy(logits, y).backward()
    return Reference(base, {n: q.detach().clone() for n, q in named.items()}, x, y, logits.detach(),
                     {n: q.grad.clone() for n, q in named.items() if q.grad is not None})


def _close(actual: Tensor, expected: Tensor, name: str, tol: float = 1e-5) -> None:
    """Relative to the tensor's scale, as test_models.py's rel_error (with the worst spot reported)."""
    scale = max(expected.detach().abs().max().item(), 1e-12)
    assert_close(actual, expected, atol=tol * scale, rtol=tol, name=name)


# -- self-tests of the reference -------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_build(family):
    fam = FAMILIES[family]
    model = build(family)
    assert model.global_pool == fam.pools[0], "first listed pool must be the model's default"
    expected = Eva if family in ROPE_FAMILIES else timm.models.vision_transformer.VisionTransformer
    assert type(model) is expected
    assert model.patch_embed.grid_size == (4, 4)
    if family in ROPE_FAMILIES:
        assert model.rope is not None
        assert all(blk.attn.num_prefix_tokens == model.num_prefix_tokens for blk in model.blocks)
    for pool in fam.pools:
        assert build(family, pool).global_pool == pool


@pytest.mark.parametrize("family,pool", FAMILY_POOLS)
def test_reference_without_prompts_is_timm(family, pool):
    model = build(family, pool)
    x, _ = images(model)
    with torch.no_grad():
        expected = model(x)
        assert_close(released_logits(copy.deepcopy(model), None, 1, x), expected, atol=1e-6, rtol=1e-6,
                     name="logits")


def _with_prompt_registers(model: nn.Module, family: str, pool: str, prompts: Tensor) -> nn.Module:
    """timm's own model with P more register tokens holding `prompts` (P, D) after the existing prefix
    tokens, and a zero position embedding at their rows: timm runs them as prefix tokens (no RoPE)."""
    p = prompts.shape[0]
    eva = isinstance(model, Eva)
    regs = model.reg_token.shape[1] if model.reg_token is not None else 0
    extended = build(family, pool, **{("num_reg_tokens" if eva else "reg_tokens"): regs + p})
    state = dict(model.state_dict())
    new_regs = prompts[None]
    state["reg_token"] = new_regs if model.reg_token is None else torch.cat([model.reg_token, new_regs], 1)
    if model.pos_embed is not None and not model.no_embed_class:
        pos, prefix = model.pos_embed, model.num_prefix_tokens
        state["pos_embed"] = torch.cat([pos[:, :prefix], pos.new_zeros(1, p, pos.shape[2]), pos[:, prefix:]], 1)
    extended.load_state_dict(state)
    assert extended.num_prefix_tokens == model.num_prefix_tokens + p
    # prompts enter after norm_pre (PE-core has one): timm's norm_pre must not touch the prompt registers
    extended.norm_pre = _SkipRows(extended.norm_pre, model.num_prefix_tokens, p)
    return extended.eval()


class _SkipRows(nn.Module):
    """`inner` on every row except rows [start, start + count), which pass through unchanged."""

    def __init__(self, inner: nn.Module, start: int, count: int) -> None:
        super().__init__()
        self.inner, self.start, self.count = inner, start, count

    def forward(self, x: Tensor) -> Tensor:
        end = self.start + self.count
        y = self.inner(x)
        return torch.cat([y[:, :self.start], x[:, self.start:end], y[:, end:]], dim=1)


@pytest.mark.parametrize("family,pool", [(f, p) for f, p in FAMILY_POOLS if p != "map"])
def test_reference_shallow_equals_timm_with_prompts_as_registers(family, pool):
    """Independent of the reference's code: shallow VPT = timm's model with the prompts as extra register
    tokens (its blocks then rotate from num_prefix_tokens + P on). 'map' pools over every row, so the
    prompts would enter it: not comparable there."""
    model = build(family, pool)
    torch.manual_seed(3)
    prompts = torch.randn(NUM_PROMPTS, model.embed_dim)
    x, _ = images(model)
    with torch.no_grad():
        expected = _with_prompt_registers(model, family, pool, prompts)(x)
        _close(released_logits(copy.deepcopy(model), lambda i: prompts, 1, x), expected, "logits", tol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_prompts_matter(family):
    """A nonzero prompt changes the output (shallow and deep; deep differs from shallow). For RoPE
    families, leaving the rope split where it was fails inside timm (its rotary table covers exactly the
    patch rows), so the moved split is what makes timm rotate the patches and nothing else."""
    model = build(family)
    x, _ = images(model)
    torch.manual_seed(4)
    sets = torch.randn(len(model.blocks), NUM_PROMPTS, model.embed_dim)

    target = copy.deepcopy(model)

    def run(num_sets, **kw):
        with torch.no_grad():
            return released_logits(target, lambda i: sets[i], num_sets, x, **kw)
    with torch.no_grad():
        plain = model(x)
    shallow, deep = run(1), run(len(model.blocks))
    for name, out in (("shallow", shallow), ("deep", deep)):
        assert (out - plain).abs().max() > 1e-3, name
    assert (deep - shallow).abs().max() > 1e-3
    if family in ROPE_FAMILIES:
        with pytest.raises(RuntimeError, match="size of tensor"):
            run(1, move_rope_split=False)
        assert all(blk.attn.num_prefix_tokens == model.num_prefix_tokens for blk in target.blocks)  # restored


# -- the matrix: every backend against the reference ----------------------------------------------

BACKENDS = vpt_fast.available_backends()


def _matrix():
    cases = []
    for family, pool in FAMILY_POOLS:
        for deep in (True, False):
            for backend in BACKENDS:
                # Triton's CPU interpreter is slow: one configuration per family
                if backend == "triton" and not (deep and pool == FAMILIES[family].pools[0]):
                    continue
                cases.append(pytest.param(family, pool, deep, backend,
                                          id=f"{family}-{pool}-{'deep' if deep else 'shallow'}-{backend}"))
    return cases


def _prompted(ref: Reference, deep: bool, backend: str, project: Optional[int] = None) -> nn.Module:
    torch.manual_seed(5)
    model = vpt_fast.prompt(copy.deepcopy(ref.base), num_prompts=NUM_PROMPTS, deep=deep, backend=backend,
                            project=project)
    trainable = {n: q for n, q in model.named_parameters() if q.requires_grad}
    assert {"vpt.prompts", "head.weight", "head.bias"} <= trainable.keys(), sorted(trainable)
    assert model.vpt.prompts.shape == ref.state["vpt.prompts"].shape
    missing = sorted(trainable.keys() - ref.state.keys())
    assert not missing, f"trainable parameters the reference does not know: {missing}"
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(ref.state[name])
    return model


def _check_against_reference(ref: Reference, model: nn.Module) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(ref.x)
    F.cross_entropy(logits, ref.y).backward()
    _close(logits, ref.logits, "logits (train)")
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"no gradient for {name}"
            _close(param.grad, ref.grads[name], f"grad of {name}")
    model.eval()
    with torch.no_grad():
        _close(model(ref.x), ref.logits, "logits (eval, no_grad)")


@pytest.mark.parametrize("family,pool,deep,backend", _matrix())
def test_family_matches_reference(family, pool, deep, backend):
    ref = reference(family, pool, deep)
    _check_against_reference(ref, _prompted(ref, deep, backend))


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("family", ["dinov3", "siglip"])
def test_projection_matches_reference(family, deep):
    ref = reference(family, FAMILIES[family].pools[0], deep, project=8)
    _check_against_reference(ref, _prompted(ref, deep, "torch", project=8))


# -- PromptBank over a DINOv3 backbone --------------------------------------------------------------


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_prompt_bank_mixed_batch_dinov3(deep):
    base = build("dinov3")
    models = []
    for t in range(3):
        torch.manual_seed(10 + t)
        model = vpt_fast.prompt(copy.deepcopy(base), num_prompts=NUM_PROMPTS, deep=deep)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(0, 0.5)
        models.append(model.eval())
    bank = vpt_fast.PromptBank(models[0]).eval()
    for t, model in enumerate(models):
        bank.add(f"task{t}", model)
    x, _ = images(base, batch=5)
    tasks = ["task0", "task2", "task1", "task1", "task0"]
    with torch.no_grad():
        out = bank(x, tasks)
        assert set(out) == set(tasks)
        for t, model in enumerate(models):
            idx = [i for i, name in enumerate(tasks) if name == f"task{t}"]
            _close(out[f"task{t}"], model(x[idx]), f"bank logits of task{t}")
            ref_model = copy.deepcopy(base)
            ref_model.head.load_state_dict(model.head.state_dict())
            sets = model.vpt.prompts
            expected = released_logits(ref_model, lambda i, sets=sets: sets[i], sets.shape[0], x[idx])
            _close(out[f"task{t}"], expected, f"bank logits of task{t} vs reference")


# -- what stays out: prompt() must refuse, naming the feature --------------------------------------

REFUSED = {  # id: (model factory, regex the error must match)
    "eva_mrope": (lambda: build("dinov3", rope_type="mrope"), r"(?i)mrope"),
    "beit": (lambda: timm.create_model("beit_base_patch16_224", pretrained=False, img_size=64, **SMALL),
             r"(?i)beit|relative.position"),
    "naflexvit": (lambda: timm.create_model("naflexvit_base_patch16_gap", pretrained=False, img_size=64, **SMALL),
                  r"(?i)naflex"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_out_of_scope_is_refused(case):
    factory, match = REFUSED[case]
    model = factory()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises((TypeError, ValueError), match=match):
        vpt_fast.prompt(model, num_prompts=NUM_PROMPTS)
    assert type(model).__module__.startswith("timm.")  # left as it was
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())


@pytest.mark.filterwarnings("ignore::UserWarning")  # prompt() may warn that the augmentation is ignored
@pytest.mark.parametrize("augment", [{"rope_shift_coords": 1.0}, {"rope_jitter_coords": 1.5},
                                     {"rope_rescale_coords": 2.0}], ids=["shift", "jitter", "rescale"])
def test_rope_coordinate_augmentation_refused_or_inert(augment):
    """timm's RoPE coordinate augmentation (DINOv3) draws new coordinates on every call, in training mode
    only. A prompted backbone stays in eval mode under train() (docs/design.md §1), so prompt() may accept
    it: then it must never apply (train-mode logits deterministic and equal to the reference, which runs
    timm in eval). Or prompt() refuses it, naming it."""
    base = build("dinov3", **augment)
    x, _ = images(base)
    timm_train = copy.deepcopy(base).train()
    with torch.no_grad():
        assert not torch.equal(timm_train(x), timm_train(x)), "timm does not augment: the test is void"
    try:
        model = vpt_fast.prompt(copy.deepcopy(base), num_prompts=NUM_PROMPTS, deep=True, backend="torch")
    except (TypeError, ValueError) as exc:
        assert re.search(r"(?i)coord|augment", str(exc)), f"refusal does not name the feature: {exc}"
        return
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5)
        model.train()
        logits = model(x)
        assert torch.equal(logits, model(x))
        ref_model = copy.deepcopy(base)
        ref_model.head.load_state_dict(model.head.state_dict())
        sets = model.vpt.prompts
        expected = released_logits(ref_model, lambda i: sets[i], sets.shape[0], x)
    _close(logits, expected, "train-mode logits vs reference")


# --- behaving like a timm model (docs/design.md §7) on the new families -------------------------------------------


@pytest.mark.parametrize("family", ["dinov3", "rope_mixed", "siglip"])
def test_forward_intermediates_are_prompted_and_timm_shaped(family):
    """timm's `forward_intermediates` on a prompted model: timm's shapes, prompt rows dropped, the
    last intermediate (normed) equal to forward_features, and the same values on every backend."""
    base = build(family)
    x, _ = images(base)
    expected_shapes = [tuple(t.shape) for t in base.forward_intermediates(x, intermediates_only=True)]
    results = {}
    for backend in ("reference", "torch"):
        model = vpt_fast.prompt(copy.deepcopy(base), num_prompts=NUM_PROMPTS, backend=backend)
        with torch.no_grad():
            model.vpt.prompts.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
            final, intermediates = model.forward_intermediates(x, norm=True, output_fmt="NLC")
            assert [tuple(t.shape) for t in model.forward_intermediates(x, intermediates_only=True)] == expected_shapes
            _close(final, model.forward_features(x), f"{family} {backend}: final features")
            npfx = model.num_prefix_tokens
            _close(intermediates[-1], final[:, npfx:], f"{family} {backend}: last intermediate")
        results[backend] = intermediates
    for got, want in zip(results["torch"], results["reference"]):
        _close(got, want, f"{family}: torch vs reference intermediates")


def test_grad_checkpointing_is_block_recompute_on_eva():
    model = vpt_fast.prompt(build("dinov3"), num_prompts=NUM_PROMPTS, backend="torch")
    x, y = images(model)
    model.train()
    plain = torch.autograd.grad(F.cross_entropy(model(x), y), model.vpt.prompts)[0]
    model.set_grad_checkpointing(True)
    assert model.vpt_config.recompute == "block" and model.grad_checkpointing
    checkpointed = torch.autograd.grad(F.cross_entropy(model(x), y), model.vpt.prompts)[0]
    _close(checkpointed, plain, "prompt gradient with grad checkpointing")


def test_prompt_file_records_the_family(tmp_path):
    """A DINOv3 prompt file names its family, loads back exactly, and is refused by a SigLIP."""
    model = vpt_fast.prompt(build("dinov3"), num_prompts=NUM_PROMPTS)
    with torch.no_grad():
        model.vpt.prompts.normal_()
    path = tmp_path / "dinov3.safetensors"
    vpt_fast.save_prompts(model, path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["model_family"] == "PromptedEva"
    again = vpt_fast.prompt(build("dinov3"), num_prompts=NUM_PROMPTS)
    vpt_fast.load_prompts(again, path)
    assert torch.equal(again.vpt.prompts, model.vpt.prompts)
    with pytest.raises(ValueError, match="PromptedEva"):
        vpt_fast.load_prompts(vpt_fast.prompt(build("siglip"), num_prompts=NUM_PROMPTS), path)
