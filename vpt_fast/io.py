"""Prompt checkpoints: the trainable state of a prompted model (docs/design.md §4), as safetensors with
metadata that identifies the configuration it was trained for."""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from vpt_fast.prompting import _prompted

_FORMAT = "vpt_fast.prompts/1"


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    named = dict(_prompted(model).state_tensors())
    for name, p in model.get_classifier().named_parameters():
        named[f"head.{name}"] = p
    return named


def prompt_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable state: {"prompts": (Lp, P, dim)}, "proj.weight"/"proj.bias" if projected,
    and "head.weight"/"head.bias" (detached copies)."""
    return {name: t.detach().clone() for name, t in _named_tensors(model).items()}


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
    named = _named_tensors(model)
    selected = {}
    for full_prefix, short_prefix, module in (("vpt.", "", _prompted(model)),
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


def _check_entry(name: str, value: object, target: Tensor) -> None:
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
    Floating-point entries are cast to the model's dtype."""
    named = _named_tensors(model)
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
        _check_entry(name, state[name], target)
    with torch.no_grad():
        for name, target in named.items():
            target.copy_(state[name])


def metadata(model: nn.Module) -> dict[str, str]:
    from vpt_fast.version import __version__
    _prompted(model)
    config = model.vpt_config
    depth = len(model.blocks) if hasattr(model, "blocks") else [len(s.blocks) for s in model.layers]
    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or ""
    return {
        "format": _FORMAT,
        "model_family": type(model).__name__,
        "architecture": architecture.removeprefix("vpt_"),  # register_timm's names build the base model
        "patch_size": str(tuple(model.patch_embed.patch_size)),
        "num_prefix_tokens": str(getattr(model, "num_prefix_tokens", 0)),
        "embed_dim": str(model.embed_dim),
        "depth": str(depth),
        "num_prompts": str(config.num_prompts),
        "deep": str(config.deep),
        "project": str(config.project),
        "num_classes": str(model.num_classes),
        "vpt_fast_version": __version__,
    }


def metadata_differences(meta: dict[str, str], expected: dict[str, str],
                         fields: Optional[Iterable[str]] = None) -> dict[str, tuple[str, str]]:
    """{field: (file's value, model's value)} for the configuration `fields` (default: all but the
    version and format) where a prompt file's metadata contradicts a model's. A field the file lacks
    (written by an older version) and an architecture unknown on either side (a model built without
    timm's registry) are not compared."""
    fields = [k for k in expected if k not in ("vpt_fast_version", "format")] if fields is None else fields
    return {k: (meta[k], expected[k]) for k in fields
            if k in meta and meta[k] != expected[k] and not (k == "architecture" and "" in (meta[k], expected[k]))}


def save_prompts(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the trainable state and its metadata to a .safetensors file."""
    from safetensors.torch import save_file
    tensors = {name: t.contiguous() for name, t in prompt_state_dict(model).items()}
    save_file(tensors, os.fspath(path), metadata=metadata(model))


def read_prompt_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by `save_prompts` (ValueError for any other file)."""
    from safetensors import safe_open
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        state = {name: f.get_tensor(name) for name in f.keys()}
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a vpt_fast prompt checkpoint (format {meta.get('format')!r})")
    return state, meta


def load_prompts(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a file written by `save_prompts`. A checkpoint made for another configuration (family,
    timm architecture, patch size, prefix tokens, width, depth, prompts, deep/shallow, projection,
    classes) raises ValueError naming the differences, and the model is left unchanged."""
    state, meta = read_prompt_file(path)
    diffs = metadata_differences(meta, metadata(model))
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"checkpoint {os.fspath(path)} was made for another configuration ({detail})")
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

    The prompted model is rebuilt (random backbone, no download) from the checkpoint's `args` as
    train.py built it (`--model`, `--num-classes`, `--gp`, `--in-chans`, `--model-kwargs`), with
    `model_name` and `overrides` taking precedence; its prompt and classifier entries are loaded
    strictly from the checkpoint (any configuration mismatch raises) and written with metadata.

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
        raise ValueError(f"model {name[len(PREFIX):]!r} is not a timm ViT or Swin model known to this timm "
                         f"({timm.__version__})")
    in_chans = args.get("in_chans") or (args["input_size"][0] if args.get("input_size") else None)
    kwargs = dict(num_classes=args.get("num_classes"), global_pool=args.get("gp"), in_chans=in_chans)
    kwargs.update(args.get("model_kwargs") or {})
    kwargs.update({key: value for key, value in overrides.items() if value is not None})
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_prompt_state_dict(model, state)
    save_prompts(model, out)
    return model
