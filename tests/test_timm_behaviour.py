"""A prompted model behaves like the timm model it was, wherever timm and PyTorch reach it: prompt()
and set_backend() are atomic and strictly typed, prompted models pickle, intermediates are prompted,
gradient checkpointing, train mode and timm's optimizer helpers work, and whatever is not supported
raises (docs/design.md §7)."""
from __future__ import annotations

import copy
import io
import linecache
import pickle
import warnings

import pytest
import timm
import torch
from torch.autograd.graph import saved_tensors_hooks

import vpt_fast
from utils import VIT_VARIANTS, prompted_swin, prompted_vit, random_batch, rel_error, tiny_swin, tiny_vit


def _snapshot(model):
    return ([type(m) for m in model.modules()], type(model),
            {n: p.requires_grad for n, p in model.named_parameters()},
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model, snapshot):
    types, cls, flags, state = snapshot
    assert [type(m) for m in model.modules()] == types and type(model) is cls
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert not hasattr(model, "vpt") and not hasattr(model, "vpt_config")


# -- prompt(): atomic and strictly typed ------------------------------------------------------------


@pytest.mark.parametrize("factory", [tiny_vit, tiny_swin], ids=["vit", "swin"])
@pytest.mark.parametrize("kwargs,error", [
    ({"num_prompts": 10 ** 10}, RuntimeError),   # allocation fails after every check passed
    ({"dropout": "0.1"}, ValueError),
    ({"deep": "False"}, TypeError),
    ({"project": True}, ValueError),
    ({"num_prompts": 2.0}, ValueError),
    ({"dropout": 1.0}, ValueError),
    ({"recompute": "everything"}, ValueError),
    ({"backend": "fastest"}, ValueError),
])
def test_prompt_failure_leaves_model_unchanged(factory, kwargs, error):
    model = factory()
    before = _snapshot(model)
    with pytest.raises(error):
        vpt_fast.prompt(model, **{"num_prompts": 3, **kwargs})
    _assert_unchanged(model, before)
    vpt_fast.prompt(model, num_prompts=3)  # a retry works
    assert model.vpt.num_prompts == 3


def test_prompt_unavailable_backend_fails_before_changing(monkeypatch):
    from vpt_fast import backends
    monkeypatch.setitem(backends._LOADED, "triton", None)
    monkeypatch.setitem(backends._REASONS, "triton", "no GPU (test)")
    model = tiny_vit()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="triton"):
        vpt_fast.prompt(model, num_prompts=3, backend="triton")
    _assert_unchanged(model, before)


def test_distilled_deit_is_refused_before_changing():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=48, depth=2, num_heads=3, num_classes=5)
    before = _snapshot(model)
    with pytest.raises(TypeError, match="VisionTransformerDistilled"):
        vpt_fast.prompt(model, num_prompts=3)
    _assert_unchanged(model, before)


def test_prompt_twice_is_refused():
    model = vpt_fast.prompt(tiny_vit(), num_prompts=3)
    with pytest.raises(ValueError, match="already prompted"):
        vpt_fast.prompt(model, num_prompts=3)


def test_set_backend_validates_before_assigning():
    model = prompted_vit(num_prompts=3, backend="torch", recompute="mlp")
    with pytest.raises(ValueError, match="recompute"):
        vpt_fast.set_backend(model, "reference", "everything")
    with pytest.raises(ValueError, match="backend"):
        vpt_fast.set_backend(model, "fastest")
    assert (model.vpt_config.backend, model.vpt_config.recompute) == ("torch", "mlp")
    assert all(b.backend == "torch" and b.recompute == "mlp" for b in model.blocks)


# -- pickling ---------------------------------------------------------------------------------------


def _round_trips(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    yield torch.load(buffer, weights_only=False)
    yield pickle.loads(pickle.dumps(model))
    yield copy.deepcopy(model)


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_prompted_models_pickle(family, deep):
    model = (prompted_vit(num_prompts=3, deep=deep, project=8) if family == "vit"
             else prompted_swin(num_prompts=3, deep=deep)).eval()
    x, _ = random_batch(model, 2)
    expected = model(x)
    for copy_ in _round_trips(model):
        assert type(copy_) is type(model)
        assert torch.equal(copy_(x), expected)
        names = [n for n, p in copy_.named_parameters() if p.requires_grad]
        assert names == [n for n, p in model.named_parameters() if p.requires_grad]


# -- timm entry points return prompted results in timm's shapes, or raise -------------------------------


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("variant", ["cls_token", "registers_avg"])
def test_vit_intermediates_are_prompted(variant, deep):
    model = prompted_vit(variant=variant, num_prompts=4, deep=deep).eval()
    plain = copy.deepcopy(model)  # same backbone weights, without prompts
    x, _ = random_batch(model, 2)
    timm_model = tiny_vit(**VIT_VARIANTS[variant])
    timm_model.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("vpt.")})
    timm_model.eval()
    for kwargs in [dict(), dict(indices=2, norm=True, output_fmt="NLC", return_prefix_tokens=True),
                   dict(indices=[0], stop_early=True, intermediates_only=True)]:
        vpt_fast.set_backend(model, "reference")
        ref = model.forward_intermediates(x, **kwargs)
        vpt_fast.set_backend(model, "torch")
        ours = model.forward_intermediates(x, **kwargs)
        unprompted = timm_model.forward_intermediates(x, **kwargs)
        flat = [t for t in _flatten(ours)]
        assert [t.shape for t in flat] == [t.shape for t in _flatten(unprompted)]
        for a, b in zip(flat, _flatten(ref)):
            assert rel_error(a, b) < 1e-5
        assert any(rel_error(a, b) > 1e-3 for a, b in zip(flat, _flatten(unprompted)))  # prompts matter
    final, _ = model.forward_intermediates(x)
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    assert torch.allclose(model.forward_head(model.forward_features(x)), model(x), atol=1e-6)
    layers = model.get_intermediate_layers(x, n=1)
    assert torch.allclose(layers[0], model.forward_intermediates(x, indices=1, output_fmt="NLC",
                                                                 intermediates_only=True)[0])


def _flatten(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        for v in value:
            yield from _flatten(v)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_swin_features_and_intermediates_are_prompted_in_timm_shapes(deep):
    model = prompted_swin(num_prompts=3, deep=deep).eval()
    timm_model = tiny_swin().eval()
    x, _ = random_batch(model, 2)
    assert model.forward_features(x).shape == timm_model.forward_features(x).shape
    for kwargs in [dict(), dict(indices=1, norm=True), dict(indices=[0], stop_early=True, intermediates_only=True)]:
        vpt_fast.set_backend(model, "reference")
        ref = list(_flatten(model.forward_intermediates(x, **kwargs)))
        vpt_fast.set_backend(model, "torch")
        ours = list(_flatten(model.forward_intermediates(x, **kwargs)))
        assert [t.shape for t in ours] == [t.shape for t in _flatten(timm_model.forward_intermediates(x, **kwargs))]
        assert all(rel_error(a, b) < 1e-5 for a, b in zip(ours, ref))
    tokens = model.forward_tokens(x)
    assert tokens.shape == (2, 3 + 7 * 7, model.num_features)
    assert torch.allclose(tokens[:, 3:].reshape(2, 7, 7, -1), model.forward_features(x), atol=1e-6)
    assert torch.allclose(model.forward_head(tokens), model(x), atol=1e-6)
    with pytest.raises(ValueError, match="forward_tokens"):
        model.forward_head(model.forward_features(x))  # would pool without the prompts


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_unsupported_entry_points_raise(family):
    model = prompted_vit(num_prompts=3) if family == "vit" else prompted_swin(num_prompts=3)
    with pytest.raises(NotImplementedError, match="prune"):
        model.prune_intermediate_layers(1)
    with pytest.raises(ValueError, match="global_pool"):  # ViT takes timm's pools (max too), Swin 'avg' only
        model.reset_classifier(7, global_pool="gem" if family == "vit" else "max")
    x, _ = random_batch(model, 1)
    if family == "vit":
        with pytest.raises(ValueError, match="attn_mask"):
            model.forward_features(x, is_causal=True)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_reset_classifier_keeps_the_head_trainable_and_last(family):
    model = prompted_vit(num_prompts=3) if family == "vit" else prompted_swin(num_prompts=3)
    model.reset_classifier(7)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names[-2:] == (["head.weight", "head.bias"] if family == "vit" else ["head.fc.weight", "head.fc.bias"])
    x, _ = random_batch(model, 2)
    assert model(x).shape == (2, 7)


def test_set_input_size_keeps_the_backbone_frozen():
    model = prompted_vit(num_prompts=3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    model.set_input_size(img_size=(40, 40))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 5)


# -- gradient checkpointing -----------------------------------------------------------------------------


def _saved_bytes(model, x):
    saved = {}
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in owned:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(saved.values())


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_grad_checkpointing_is_honoured(family, backend):
    model = (prompted_vit(num_prompts=4) if family == "vit" else prompted_swin(num_prompts=4)).train()
    vpt_fast.set_backend(model, backend)
    x, _ = random_batch(model, 2)
    torch.manual_seed(0)
    plain = _saved_bytes(model, x)
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(b.recompute == "block" for b in model.modules() if getattr(b, "is_vpt_block", False)
               and hasattr(b, "mlp"))
    torch.manual_seed(0)
    checkpointed = _saved_bytes(model, x)
    assert checkpointed < 0.5 * plain, (checkpointed, plain)
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        assert rel_error(p.grad, g) < 1e-5
    model.set_grad_checkpointing(False)
    assert all(b.recompute == "none" for b in model.modules() if getattr(b, "is_vpt_block", False))
    vpt_fast.set_backend(model, backend, "mlp")  # set_backend keeps checkpointing's "block" while it is on
    model.set_grad_checkpointing(True)
    vpt_fast.set_backend(model, backend)
    assert all(b.recompute == "block" for b in model.modules() if getattr(b, "is_vpt_block", False))


# -- train mode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_train_mode_round_trip(family):
    model = prompted_vit(num_prompts=3, dropout=0.1) if family == "vit" else prompted_swin(num_prompts=3, dropout=0.1)
    model.train()
    assert model.training and model.vpt.training and model.head.training
    was_training = model.training  # the usual "remember mode, eval, restore" loop
    model.eval()
    assert not model.training and not model.vpt.training and not model.head.training
    model.train(was_training)
    assert model.training and model.vpt.dropout.training
    head = {"head", "fc_norm", "head_drop"} if family == "vit" else {"head"}
    backbone = [n for n, m in model.named_modules()
                if m.training and n and not n.startswith("vpt") and n.split(".")[0] not in head]
    assert backbone == []


def test_backbone_dropout_warns_once():
    with pytest.warns(UserWarning, match="drop_path") as record:
        vpt_fast.prompt(tiny_vit(drop_path_rate=0.1), num_prompts=3)
    assert record[0].filename == __file__  # the user's prompt() line, not a line inside vpt_fast
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = vpt_fast.prompt(tiny_vit(), num_prompts=3)
        model.train()(random_batch(model, 1)[0])


# -- timm's optimizer helpers -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_head_parameters_come_last(family):
    model = prompted_vit(num_prompts=3, project=8) if family == "vit" else prompted_swin(num_prompts=3)
    head = set(model.get_classifier().parameters())
    params = list(model.parameters())
    assert set(params[-2:]) == head  # timm's get_clip_parameters(exclude_head=True) drops the last two
    assert all(p.requires_grad for p in params[-2:])


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_layer_decay_groups_prompts_with_their_first_block(family):
    from timm.models import group_parameters
    from timm.optim import param_groups_layer_decay
    model = prompted_vit(num_prompts=3, deep=False, project=8) if family == "vit" else prompted_swin(num_prompts=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    if family == "vit":
        assert layer_of["vpt.prompts"] == layer_of["vpt.proj.weight"] == layer_of["blocks.0.norm1.weight"]
    else:
        for s in range(2):
            assert layer_of[f"vpt.prompts.{s}"] == layer_of[f"layers.{s}.blocks.0.norm1.weight"]
    assert layer_of["vpt.prompts" if family == "vit" else "vpt.prompts.0"] < max(layer_of.values())
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    deep = prompted_vit(num_prompts=3, deep=True)
    with pytest.warns(UserWarning, match="layer decay"):
        deep.group_matcher()


def test_recompute_mlp_warns_where_it_cannot_apply():
    from timm.layers import SwiGLUPacked
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SwiGLU recomputes its fc1 too: nothing to warn about
        vpt_fast.prompt(tiny_vit(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2.0), num_prompts=3,
                        recompute="mlp")
    model = tiny_vit(act_layer="gelu_tanh")  # timm's Mlp with tanh GELU: not the fused MLP
    with pytest.warns(UserWarning, match='recompute="mlp" applies to timm'):
        vpt_fast.prompt(model, num_prompts=3, recompute="mlp")
    x, _ = random_batch(model, 2)
    assert model(x).shape == (2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vpt_fast.set_backend(model, "torch", "none")  # nothing to warn about


# -- model options that look supported but are not what the blocks compute ---------------------------


def test_attention_subclasses_are_refused_before_changing():
    """timm's differential attention (attn_layer='diff') has Attention's attribute names but other
    arithmetic: refused when prompting, not a crash (or a different result) at the first forward."""
    model = tiny_vit(attn_layer="diff")
    before = _snapshot(model)
    with pytest.raises(TypeError, match="DiffAttention"):
        vpt_fast.prompt(model, num_prompts=3)
    _assert_unchanged(model, before)


def test_mlp_lookalikes_run_timm_module_and_match_reference():
    """GluMlp with GELU has fc1/act/fc2 like timm's Mlp but gates half of fc1: it is not fused, it runs
    as timm's module, and the prompt-aware backend equals the reference."""
    from timm.layers import GluMlp
    model = vpt_fast.prompt(tiny_vit(mlp_layer=GluMlp, act_layer=torch.nn.GELU), num_prompts=3, backend="torch")
    x, _ = random_batch(model, 2)
    fast = model(x)
    vpt_fast.set_backend(model, "reference")
    assert rel_error(fast, model(x)) < 1e-5


def test_patch_dropout_is_named_in_the_ignored_dropout_warning():
    with pytest.warns(UserWarning, match="patch_drop=0.5"):
        vpt_fast.prompt(tiny_vit(patch_drop_rate=0.5), num_prompts=3)


def test_swin_grad_checkpointing_set_before_prompting_is_kept():
    """timm Swin keeps the flag on its stages; prompting turns it into recompute="block"."""
    model = tiny_swin()
    model.set_grad_checkpointing(True)
    vpt_fast.prompt(model, num_prompts=3)
    assert model.grad_checkpointing
    assert all(b.recompute == "block" for b in model.modules() if getattr(b, "is_vpt_block", False))


def test_recompute_mlp_with_reference_backend_warns():
    with pytest.warns(UserWarning, match='no effect with backend="reference"'):
        vpt_fast.prompt(tiny_vit(), num_prompts=3, backend="reference", recompute="mlp")


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_hooks_the_fused_blocks_bypass_warn(family):
    """Prompt-aware blocks apply their submodules' weights without calling them: a hook there would
    silently never fire, so the forward warns and names it; the reference backend runs it."""
    model = prompted_vit(num_prompts=3) if family == "vit" else prompted_swin(num_prompts=3)
    x, _ = random_batch(model, 1)
    block = model.blocks[0] if family == "vit" else model.layers[0].blocks[0]
    calls = []
    block.mlp.fc1.register_forward_hook(lambda *args: calls.append(1))
    with pytest.warns(UserWarning, match=r"hooks on mlp\.fc1 of a (ViT|Swin)Block do not run"):
        model(x)
    assert calls == []
    vpt_fast.set_backend(model, "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
    assert calls


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_hook_warning_points_at_the_line_that_called_the_model(family):
    """The warning is raised several module calls deep (timm's forward, torch's module calls); it
    names the user's line, where the hooked model is called, not torch's module.py."""
    model = prompted_vit(num_prompts=3) if family == "vit" else prompted_swin(num_prompts=3)
    x, _ = random_batch(model, 1)
    block = model.blocks[0] if family == "vit" else model.layers[0].blocks[0]
    block.mlp.fc1.register_forward_hook(lambda *args: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x)
    hook_warnings = [w for w in caught if "do not run with backend" in str(w.message)]
    assert hook_warnings and all(w.filename == __file__ for w in hook_warnings)
    assert all(linecache.getline(w.filename, w.lineno).strip() == "model(x)" for w in hook_warnings)


def test_flop_count_does_not_trip_the_hook_warning():
    """FlopCounterMode's module tracker registers global module hooks: count_flops (behind `vpt-fast
    bench`) says they are its own, so the fused blocks stay quiet; a global hook registered before
    the measurement is still someone else's and still warns."""
    from torch.nn.modules.module import register_module_forward_hook

    from vpt_fast.bench import count_flops
    model = prompted_vit(num_prompts=3)
    x, _ = random_batch(model, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_flops(lambda: model(x)) > 0
    handle = register_module_forward_hook(lambda *args: None)
    try:
        with pytest.warns(UserWarning, match=r"hooks on \(global module hooks\) of a ViTBlock"):
            count_flops(lambda: model(x))
    finally:
        handle.remove()
