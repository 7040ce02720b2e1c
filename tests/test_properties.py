"""Property-based tests (hypothesis): small ViT and Swin configurations drawn at random, beyond what
the hand-written parametrisations cover.

- Every backend that runs on this machine's CPU, against the independent transcription of the
  released VPT code on timm's unmodified model (tests/utils.py): logits (train and eval mode) and the
  gradients of prompts, projection and head, fp32, relative error < 1e-4 (docs/design.md §5).
- `PromptBank`: a task whose configuration differs from the bank's model in any one field (drawn
  value), or of the other family, is refused with ValueError, although most parameters the two share
  hold the same values; a task of the same configuration and backbone is accepted and the bank gives
  it its own model's logits.

Profiles: "ci" (default: few examples, derandomized so that every run checks the same ones) and
"slow" (many more, random): `VPT_HYPOTHESIS_PROFILE=slow pytest tests/test_properties.py`.
Triton is left out: its CPU interpreter is far too slow for drawn shapes (test_models and test_swin
run it on fixed small ones).
"""
from __future__ import annotations

import copy
import itertools
import os

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vpt_fast
from utils import randomize, rel_error, released_swin_logits, released_vit_logits

TOL = 1e-4  # fp32 on CPU, docs/design.md §5
# logits are compared relative to at least this (§5's tiny atol): a logit that cancels to ~0 keeps the
# fp32 rounding error of the terms it sums (seen: 2.7e-7 on a single logit of 0.0022)
LOGIT_SCALE = 1e-2
BACKENDS = ["reference"] + [b for b in vpt_fast.available_backends() if b in ("torch", "cuda")]

# database=None: nothing is written into the checkout; a failure prints its example (and a
# @reproduce_failure blob) to rerun it
settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=200, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("VPT_HYPOTHESIS_PROFILE", "ci"))

# -- configurations -----------------------------------------------------------------------------
# A configuration is a flat dict of independent fields, each drawn from a list of values (so that a
# bank test can set one field of a draw to another value); `build` turns it into a model.

PROMPT_FIELDS = dict(num_prompts=list(range(1, 7)), deep=[False, True], project=[None, 4, 16])

VIT_FIELDS = dict(
    depth=[1, 2, 3],
    num_heads=[1, 2, 3],
    embed_dim=[24, 48],  # both divisible by every head count: same width, other heads
    img_size=[16, 24, 32],  # patch 8: 2x2 to 4x4 patches
    # (class_token, global_pool): 'token' pooling needs the class token
    class_token_pool=[(True, "token"), (True, "avg"), (True, ""), (False, "avg"), (False, "")],
    reg_tokens=[0, 1, 2],
    fc_norm=[False, True],
    pre_norm=[False, True],
    qk_norm=[False, True],
    init_values=[None, 0.1, 0.5],  # LayerScale
    no_embed_class=[False, True],
    **PROMPT_FIELDS,
)


def _swin_geometries() -> list[tuple[int, int, int]]:
    """(stages, window, patch grid) with every stage's grid even before a merge and a multiple of its
    window (timm shrinks the window to a smaller grid): the released code does not pad."""
    out = []
    for stages in (1, 2, 3):
        for window in (2, 3, 4, 7):
            for grid in range(2, 13):  # up to 48 px
                grids = [grid // 2 ** s for s in range(stages)]
                if grid % 2 ** (stages - 1) == 0 and all(g <= window or g % window == 0 for g in grids):
                    out.append((stages, window, grid))
    return out


SWIN_FIELDS = dict(
    geometry=_swin_geometries(),
    depths=list(itertools.product([1, 2], repeat=3)),  # the first `stages` are used
    embed_dim=[16, 24],
    heads=[1, 2],  # stage 0; doubles with the width
    **PROMPT_FIELDS,
)
FIELDS = {"vit": VIT_FIELDS, "swin": SWIN_FIELDS}
RECOMPUTE = st.sampled_from(["none", "mlp", "block"])  # not a configuration field: the same model either way
# the reference backend says so when it is given recompute="mlp" (timm's modules run there)
IGNORE_MLP_RECOMPUTE = pytest.mark.filterwarnings('ignore:recompute="mlp" has no effect with backend="reference"')


def configurations(family: str) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({name: st.sampled_from(values) for name, values in FIELDS[family].items()})


def model_kwargs(family: str, config: dict) -> tuple[dict, dict]:
    """(timm create_model kwargs, prompt() kwargs) of a configuration."""
    prompt_kwargs = {k: config[k] for k in PROMPT_FIELDS}
    if family == "vit":
        kwargs = {k: v for k, v in config.items() if k not in PROMPT_FIELDS and k != "class_token_pool"}
        kwargs["class_token"], kwargs["global_pool"] = config["class_token_pool"]
        return dict(kwargs, patch_size=8), prompt_kwargs
    stages, window, grid = config["geometry"]
    return dict(img_size=4 * grid, window_size=window, embed_dim=config["embed_dim"], depths=config["depths"][:stages],
                num_heads=tuple(config["heads"] * 2 ** s for s in range(stages)), drop_path_rate=0.0), prompt_kwargs


def model_identity(family: str, config: dict) -> tuple:
    """Equal for two configurations exactly when they build the same model: timm shrinks a Swin
    window to a smaller grid, and a ViT without prefix tokens embeds positions alike with or without
    no_embed_class."""
    kwargs, prompt_kwargs = model_kwargs(family, config)
    if family == "swin":
        grid = config["geometry"][2]
        kwargs["window_size"] = tuple(min(kwargs["window_size"], grid // 2 ** s) for s in range(len(kwargs["depths"])))
    elif not kwargs["class_token"] and not kwargs["reg_tokens"]:
        kwargs["no_embed_class"] = False
    return sorted(kwargs.items()), sorted(prompt_kwargs.items())


def build(family: str, config: dict, num_classes: int, seed: int = 0):
    """(prompted model with random prompts/projection/head, the unprompted timm model it was made
    from, in eval mode, its head holding the prompted model's head)."""
    torch.manual_seed(seed)
    kwargs, prompt_kwargs = model_kwargs(family, config)
    base = "vit_small_patch16_224" if family == "vit" else "swin_tiny_patch4_window7_224"
    timm_model = timm.create_model(base, pretrained=False, num_classes=num_classes, **kwargs)
    timm_model.eval().requires_grad_(False)
    model = randomize(vpt_fast.prompt(copy.deepcopy(timm_model), **prompt_kwargs))
    timm_model.head.load_state_dict(model.head.state_dict())
    return model, timm_model


def images(model, batch: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=g)


# -- every backend against the released code ------------------------------------------------------

def released_results(family: str, model, timm_model, x, weights):
    """Logits of the released-code transcription and the gradients of (logits * weights).sum() with
    respect to copies of the prompted model's prompts/projection (read as plain tensors and Linear
    layers) and to the timm model's head, named as the prompted model names its parameters."""
    prompts = copy.deepcopy(model.vpt)
    timm_model.head.requires_grad_(True)
    deep = model.vpt_config.deep
    if family == "vit":
        logits = released_vit_logits(timm_model, prompts.prompts, prompts.proj, deep, x)
    else:
        sets = [p if prompts.proj is None else prompts.proj[s](p) for s, p in enumerate(prompts.prompts)]
        # the released Swin code mixes samples' windows at batch > 1 (docs/design.md §1): it is the
        # contract at batch 1, so it runs sample by sample
        logits = torch.cat([released_swin_logits(timm_model, sets, deep, x[b:b + 1]) for b in range(x.shape[0])])
    (logits * weights).sum().backward()
    grads = {f"vpt.{n}": p.grad for n, p in prompts.named_parameters()}
    grads.update({f"head.{n}": p.grad for n, p in timm_model.head.named_parameters()})
    return logits.detach(), grads


def check_backends(family: str, model, timm_model, batch: int, recompute: str) -> None:
    x = images(model, batch)
    with torch.no_grad():
        shape = model(x).shape
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    expected, expected_grads = released_results(family, model, timm_model, x, weights)
    assert all(g.abs().sum() > 0 for g in expected_grads.values()), "a gradient is zero: the check would be void"
    for backend in BACKENDS:
        vpt_fast.set_backend(model, backend, recompute)
        model.train()
        model.zero_grad(set_to_none=True)
        logits = model(x)
        (logits * weights).sum().backward()
        assert rel_error(logits, expected, LOGIT_SCALE) < TOL, f"{backend}: training logits"
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert grads.keys() == expected_grads.keys(), backend
        for name, grad in grads.items():
            assert rel_error(grad, expected_grads[name]) < TOL, f"{backend}: gradient of {name}"
        model.eval()
        with torch.no_grad():  # the inference paths (prompt K/V cache, last block on the class row only)
            assert rel_error(model(x), expected, LOGIT_SCALE) < TOL, f"{backend}: eval logits"


@IGNORE_MLP_RECOMPUTE
@PROFILE
@given(config=configurations("vit"), num_classes=st.integers(1, 5), batch=st.integers(1, 3), recompute=RECOMPUTE)
def test_vit_backends_equal_the_released_code(config, num_classes, batch, recompute):
    check_backends("vit", *build("vit", config, num_classes), batch, recompute)


@IGNORE_MLP_RECOMPUTE
@PROFILE
@given(config=configurations("swin"), num_classes=st.integers(1, 5), batch=st.integers(1, 3), recompute=RECOMPUTE)
def test_swin_backends_equal_the_released_code(config, num_classes, batch, recompute):
    check_backends("swin", *build("swin", config, num_classes), batch, recompute)


# -- PromptBank: only a task of the bank's configuration and backbone -----------------------------

@PROFILE
@given(family=st.sampled_from(list(FIELDS)), data=st.data())
def test_bank_takes_only_a_task_of_its_configuration(family, data):
    """For a drawn configuration: a task of the same configuration and backbone (its own prompts, head
    and class count) is accepted and the bank gives each task its own model's logits; a task that
    differs in any single field (drawn value), or is of the other family, is refused. The tasks are
    built from the same seed, so parameters they share with the bank's backbone by name and shape
    mostly hold the same values: the comparison has to look at what differs, not at what is shared."""
    config = data.draw(configurations(family), label="bank configuration")
    classes = data.draw(st.integers(1, 5), label="bank classes")
    model, _ = build(family, config, classes)
    bank = vpt_fast.PromptBank(model.eval())
    bank.add("a", model)
    task = copy.deepcopy(model)
    task.reset_classifier(data.draw(st.integers(1, 5), label="task classes"))
    torch.manual_seed(1)
    bank.add("b", randomize(task).eval())
    tasks = data.draw(st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=4), label="tasks")
    x = images(model, len(tasks))
    with torch.no_grad():
        out = bank(x, tasks)
        for name, own in (("a", model), ("b", task)):
            rows = [i for i, t in enumerate(tasks) if t == name]
            if rows:
                assert rel_error(out[name], own(x[rows]), LOGIT_SCALE) < TOL, name

    for field, values in FIELDS[family].items():
        changes = [v for v in values if model_identity(family, {**config, field: v}) != model_identity(family, config)]
        if not changes:  # e.g. no_embed_class without prefix tokens
            continue
        value = data.draw(st.sampled_from(changes), label=field)
        other, _ = build(family, {**config, field: value}, classes)
        with pytest.raises(ValueError):
            bank.add("c", other.eval())
            pytest.fail(f"a task with {field}={value!r} (the bank's: {config[field]!r}) was accepted")
    other_family = "swin" if family == "vit" else "vit"
    other, _ = build(other_family, data.draw(configurations(other_family), label=other_family), classes)
    with pytest.raises(ValueError):
        bank.add("c", other.eval())
