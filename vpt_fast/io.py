"""Prompt checkpoints: the trainable state of a prompted model (docs/design.md §4), as safetensors with
metadata that identifies the configuration it was trained for."""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from vpt_fast import backbone, fsdp
from vpt_fast.models.families import family_of
from vpt_fast.prompting import prompts_of

_FORMAT = "vpt_fast.prompts/1"


def trainable_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The prompted model's trainable tensors under `prompt_state_dict` names (not copies)."""
    named = dict(prompts_of(model).state_tensors())
    for name, p in model.get_classifier().named_parameters():
        named[f"head.{name}"] = p
    return named


def prompt_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable state: {"prompts": (Lp, P, dim)}, "proj.weight"/"proj.bias" if projected,
    and "head.weight"/"head.bias" (detached copies). Of a sharded (FSDP2) model: whole tensors,
    gathered from every rank (a collective: call it on every rank)."""
    return {name: fsdp.full_tensor(t.detach()).clone() for name, t in trainable_tensors(model).items()}


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _qualified_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"the model's classifier ({type(module).__name__}) is not one of its submodules")


def _is_whole_model_state(state: Mapping[str, Tensor]) -> bool:
    return any(_strip_wrappers(key).startswith("vpt.") for key in state)


def _prompt_entries(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries of `state` under `prompt_state_dict` names. `state` is either a prompt state dict,
    or the whole model's state_dict (it has `vpt.` keys): then the prompt module's entries and the
    classifier's (`head.fc.` for Swin) are taken, everything else (the frozen backbone) is left out.
    `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes are removed first."""
    whole_model = _is_whole_model_state(state)
    state = {_strip_wrappers(key): value for key, value in state.items()}
    if not whole_model:
        return state
    classifier = model.get_classifier()
    named = trainable_tensors(model)
    selected = {}
    for full_prefix, short_prefix, module in (("vpt.", "", prompts_of(model)),
                                              (_qualified_name(model, classifier) + ".", "head.", classifier)):
        # the module's own non-trainable entries (buffers) are not prompt state; an entry the module
        # does not have at all (say a projection this model lacks) is kept, to be reported unexpected
        own_keys = set(module.state_dict())
        for key, value in state.items():
            if key.startswith(full_prefix):
                local = key[len(full_prefix):]
                if short_prefix + local in named or local not in own_keys:
                    selected[short_prefix + local] = value
    return selected


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', ... ({len(names) - limit} more)' if len(names) > limit else ''}]"


def check_entry(name: str, value: object, target: Tensor) -> None:
    """Raise ValueError unless `value` can be loaded into the prompt state entry `target`: a finite
    floating-point tensor of its shape."""
    if not isinstance(value, Tensor):
        raise ValueError(f"prompt state {name!r} is a {type(value).__name__}, expected a tensor")
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"prompt state {name!r} has shape {tuple(value.shape)}, "
                         f"the model expects {tuple(target.shape)}")
    # casts between floating dtypes are what load_state_dict does; an integer, bool or complex
    # tensor is not a prompt checkpoint
    if not value.is_floating_point():
        raise ValueError(f"prompt state {name!r} has dtype {value.dtype}, expected a floating-point "
                         f"tensor (the model holds {target.dtype})")
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        raise ValueError(f"prompt state {name!r} has {int((~finite).sum())} non-finite values (NaN or inf) "
                         f"of {value.numel()}")


def load_prompt_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a `prompt_state_dict`, or the prompt and classifier entries of a whole prompted model's
    state_dict (e.g. `state_dict` or `state_dict_ema` of a timm train.py checkpoint; `module.`
    prefixes of DDP are removed). Strict: missing, unexpected or mis-shaped entries, non-floating
    dtypes and NaN/inf values raise ValueError naming the entry, and leave the model unchanged.
    Floating-point entries are cast to the model's dtype. A sharded (FSDP2) model is loaded on every
    rank from the whole tensors: each rank keeps its slice."""
    if fsdp.is_fsdp_module(model):
        model.reshard()  # after a forward without backward the root holds whole copies, which reshard() drops
    named = trainable_tensors(model)
    entries = _prompt_entries(model, state)
    missing = sorted(set(named) - set(entries))
    unexpected = sorted(set(entries) - set(named))
    if missing or unexpected:
        hint = "" if _is_whole_model_state(state) or not unexpected else (
            " (a whole-model state_dict must be a prompted model's: with `vpt.` entries)")
        raise ValueError(f"prompt state does not match the model: missing {_listed(missing)}, "
                         f"unexpected {_listed(unexpected)}{hint}")
    state = entries
    for name, target in named.items():
        check_entry(name, state[name], target)
    with torch.no_grad():
        for name, target in named.items():
            value = state[name]
            if fsdp.is_dtensor(target):  # this rank's slice of the whole tensor, no communication
                from torch.distributed.tensor import distribute_tensor
                value = distribute_tensor(value.detach().to(target.device, target.dtype), target.device_mesh,
                                          target.placements, src_data_rank=None)
            target.copy_(value)
    if fsdp.is_sharded(model):  # the gathered copies the prompt K/V cache may key on keep their versions
        from vpt_fast.prompt_cache import clear_caches
        clear_caches(model)


def configuration_metadata(model: nn.Module) -> dict[str, str]:
    """The readable fields of `metadata`: the prompt configuration and the backbone's configuration
    (`vpt_fast.backbone.configuration`)."""
    prompts_of(model)
    config = model.vpt_config
    depth = family_of(model).depth(model)
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or ""
    return {
        "model_family": fsdp.unwrapped_class(model).__name__,
        "architecture": architecture.removeprefix("vpt_"),  # register_timm's names build the base model
        "patch_size": str(tuple(model.patch_embed.patch_size)),
        "num_prefix_tokens": str(getattr(model, "num_prefix_tokens", 0)),
        "embed_dim": str(model.embed_dim),
        "depth": str(depth),
        "num_prompts": str(config.num_prompts),
        "deep": str(config.deep),
        "project": str(config.project),
        "num_classes": str(model.num_classes),
        **backbone.configuration(model),
    }


def metadata(model: nn.Module) -> dict[str, str]:
    """What a prompt file records about the model it was saved from: `configuration_metadata`, the
    format and version, and, as JSON, the backbone's structure and a signature of its frozen weights
    (`backbone_structure`, `backbone_weights`; `vpt_fast.backbone`)."""
    from vpt_fast.version import __version__
    meta = {"format": _FORMAT, **configuration_metadata(model), "vpt_fast_version": __version__,
            "backbone_structure": backbone.dumps(backbone.structure(model))}
    weights = backbone.weights_signature(model)
    if weights is not None:
        meta["backbone_weights"] = backbone.dumps(weights)
    return meta


# Compared only with check_backbone=True: which backbone computes the prompts' function.
BACKBONE_FIELDS = ("architecture",) + backbone.GEOMETRY_FIELDS
_NOT_COMPARED = ("vpt_fast_version", "format", "backbone_structure", "backbone_weights")


def metadata_differences(meta: dict[str, str], expected: dict[str, str],
                         fields: Optional[Iterable[str]] = None) -> dict[str, tuple[str, str]]:
    """{field: (file's value, model's value)} for the configuration `fields` (default: all but the
    version, format and the JSON backbone records) where a prompt file's metadata contradicts a
    model's. A field the file lacks (written by an older version) and an architecture unknown on
    either side (a model built without timm's registry) are not compared."""
    fields = [k for k in expected if k not in _NOT_COMPARED] if fields is None else fields
    return {k: (meta[k], expected[k]) for k in fields
            if k in meta and k in expected and meta[k] != expected[k]
            and not (k == "architecture" and "" in (meta[k], expected[k]))}


def check_metadata(meta: dict[str, str], model: nn.Module, source: str, check_backbone: bool = True,
                   skip: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the first way a prompt file's metadata (`meta`) does not fit `model`:
    a configuration field (prompts, head, pooling, tokens), or with `check_backbone` the backbone it
    was trained on (architecture, geometry, module structure, frozen weights). `source` names the
    file in the message; `skip` lists fields not to compare (e.g. the bank ignores num_classes)."""
    expected = configuration_metadata(model)
    fields = [k for k in expected if k not in skip and (check_backbone or k not in BACKBONE_FIELDS)]
    diffs = metadata_differences(meta, expected, fields)
    if diffs:
        detail = ", ".join(f"{k}: {a!r} in the file vs {b!r} in the model" for k, (a, b) in diffs.items())
        opt_out = (" (check_backbone=False loads it anyway)"
                   if set(diffs) <= set(BACKBONE_FIELDS) else "")
        raise ValueError(f"{source} was made for another configuration ({detail}){opt_out}")
    if not check_backbone:
        return
    # the model's side as objects (what `metadata` would write as JSON), computed only when compared
    what = ("the file's", "the model's")
    difference = None
    if "backbone_structure" in meta:
        difference = backbone.structure_difference(json.loads(meta["backbone_structure"]),
                                                   backbone.structure(model), what)
    weights = backbone.weights_signature(model) if difference is None and "backbone_weights" in meta else None
    if weights is not None:
        difference = backbone.weights_difference(json.loads(meta["backbone_weights"]), weights, what)
    if difference is not None:
        raise ValueError(f"{source} was trained on another backbone: {difference}. Its prompts and head give the "
                         f"logits they were trained for only on that backbone; pass check_backbone=False to load "
                         f"it anyway")


def save_prompts(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the trainable state and its metadata (`metadata`) to a .safetensors file.

    A sharded (FSDP2) model: a collective, call it on every rank. The whole tensors and the backbone's
    weight signature are gathered on every rank, and rank 0 writes the file (docs/design.md §7)."""
    _write_prompt_file(model, path, metadata(model))


def _write_prompt_file(model: nn.Module, path: str | os.PathLike, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file
    tensors = {name: t.contiguous() for name, t in prompt_state_dict(model).items()}
    if not fsdp.is_sharded(model) or fsdp.writes_files():
        save_file(tensors, os.fspath(path), metadata=meta)


def _load_backbone(model: nn.Module, state: Mapping[str, Tensor]) -> bool:
    """Copy the frozen backbone's persistent tensors from a whole-model `state` into `model`; False
    (and nothing copied) when `state` does not hold every one of them with the model's shape."""
    entries = {_strip_wrappers(key): value for key, value in state.items()}
    persistent = set(model.state_dict())
    frozen = {name: t for name, t in backbone.frozen_tensors(model).items() if name in persistent}
    if not all(isinstance(entries.get(name), Tensor) and entries[name].shape == t.shape for name, t in frozen.items()):
        return False
    with torch.no_grad():
        for name, t in frozen.items():
            t.copy_(entries[name])
    return True


def read_prompt_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by `save_prompts`. A path that is missing, a directory,
    or not a readable safetensors file raises an error naming it; any other safetensors file
    raises ValueError."""
    from safetensors import SafetensorError, safe_open
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"prompt file {name} does not exist")
    if os.path.isdir(name):
        raise IsADirectoryError(f"prompt file {name} is a directory, expected a .safetensors file written by "
                                f"vpt_fast.save_prompts")
    try:
        with safe_open(name, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"prompt file {name} is not a readable safetensors file (truncated or another "
                         f"format?): {error}") from error
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{name} is not a vpt_fast prompt checkpoint (format {meta.get('format')!r})")
    return state, meta


def load_prompts(model: nn.Module, path: str | os.PathLike, check_backbone: bool = True) -> None:
    """Load a file written by `save_prompts`; the model is left unchanged when anything is refused.

    Args:
        model: a prompted model.
        path: the .safetensors file.
        check_backbone: refuse a file trained on another backbone: another timm architecture, image
            size or Swin window sizes, module structure (e.g. qk-norm, norm eps, activation, heads)
            or frozen weights (another pretrained tag). False loads it anyway, for someone who means
            it. A file made for another configuration of the prompts or head (family, patch size,
            tokens, width, depth, prompts, deep/shallow, projection, classes, pooling, fc_norm,
            norm_pre) is refused either way. Fields a file lacks (older versions) are not compared.
    """
    state, meta = read_prompt_file(path)
    check_metadata(meta, model, f"checkpoint {os.fspath(path)}", check_backbone)
    load_prompt_state_dict(model, state)


def read_train_checkpoint(path: str | os.PathLike, ema: bool = False) -> tuple[dict[str, Tensor], dict]:
    """The model state_dict and training arguments of a timm `train.py` checkpoint.

    Args:
        path: a checkpoint written by timm's `CheckpointSaver` (`{'epoch', 'arch', 'state_dict',
            'optimizer', 'version', 'args', 'state_dict_ema', 'metric', ...}`), or a bare state_dict.
        ema: take `state_dict_ema` (train.py saves it with `--model-ema`) instead of `state_dict`.

    Returns:
        (state_dict, args): `args` is the saved argparse namespace as a dict (empty when the
        checkpoint has none). Loaded with `weights_only=True` (argparse.Namespace allowed, as
        timm does).
    """
    import argparse
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{os.fspath(path)} holds a {type(checkpoint).__name__}, expected a train.py "
                         f"checkpoint (a dict with 'state_dict') or a state_dict")
    key = "state_dict_ema" if ema else "state_dict"
    if checkpoint.get(key) is not None:
        state = checkpoint[key]
    elif ema:
        raise ValueError(f"{os.fspath(path)} has no 'state_dict_ema' (train.py saves one only with "
                         f"--model-ema); entries: {_listed(sorted(checkpoint))}")
    elif checkpoint and all(isinstance(value, Tensor) for value in checkpoint.values()):
        state = checkpoint
    else:
        raise ValueError(f"{os.fspath(path)} has no 'state_dict' and is not a state_dict itself; "
                         f"entries: {_listed(sorted(checkpoint))}")
    args = checkpoint.get("args") if state is not checkpoint else None
    # without `args`, train.py's 'arch' is the model's class name, not a timm name: not used
    return dict(state), dict(vars(args) if isinstance(args, argparse.Namespace) else args or {})


def export_train_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, ema: bool = False,
                            model_name: str | None = None, **overrides) -> nn.Module:
    """Turn a timm `train.py` checkpoint of a prompted model into a prompt file (`save_prompts`).

    The prompted model is rebuilt (no download) from the checkpoint's `args` as train.py built it
    (`--model`, `--num-classes`, `--gp`, `--in-chans`, `--model-kwargs`), with `model_name` and
    `overrides` taking precedence; its prompt and classifier entries are loaded strictly from the
    checkpoint (any configuration mismatch raises), its frozen backbone from the checkpoint's own
    backbone entries, and all are written with metadata. A checkpoint without the backbone (a bare
    prompt state dict) gives a file without the backbone weight signature, as older files are.

    Args:
        checkpoint: the train.py checkpoint (or a prompted model's bare state_dict).
        out: the .safetensors file to write.
        ema: export `state_dict_ema` instead of `state_dict`.
        model_name: timm name, `vpt_<name>` or `<name>` (needed when the checkpoint has no `args`).
        overrides: `num_classes` and `prompt()` keywords (`num_prompts`, `deep`, `project`, ...);
            None values are ignored.

    Returns:
        The rebuilt prompted model, holding the exported state.
    """
    import timm

    from vpt_fast.timm_models import PREFIX, register_timm
    state, args = read_train_checkpoint(checkpoint, ema)
    name = model_name or args.get("model")
    if not name:
        raise ValueError(f"{os.fspath(checkpoint)} does not name its model (no 'args' entry): "
                         f"pass the timm model name")
    name = name if name.startswith(PREFIX) else PREFIX + name
    register_timm()
    if not timm.is_model(name):
        base = name[len(PREFIX):]
        raise ValueError(f"model {base!r} is not supported by vpt_fast.prompt" if timm.is_model(base) else
                         f"model {base!r} is not a timm model known to this timm ({timm.__version__})")
    in_chans = args.get("in_chans") or (args["input_size"][0] if args.get("input_size") else None)
    kwargs = dict(num_classes=args.get("num_classes"), global_pool=args.get("gp"), in_chans=in_chans)
    kwargs.update(args.get("model_kwargs") or {})
    kwargs.update({key: value for key, value in overrides.items() if value is not None})
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_prompt_state_dict(model, state)
    meta = metadata(model) if _load_backbone(model, state) else {
        k: v for k, v in metadata(model).items() if k != "backbone_weights"}
    _write_prompt_file(model, out, meta)
    return model
