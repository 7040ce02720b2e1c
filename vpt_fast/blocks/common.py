"""What the prompt-aware blocks share (ViT, Eva, Swin): the pre-norm residual + MLP tail, the frozen
branch scales, the prompt K/V containers, and the warning for module hooks the fused paths bypass.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Iterator, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from vpt_fast.ops.add_layer_norm import add_layer_norm
from vpt_fast.ops.layer_norm import layer_norm
from vpt_fast.ops.mlp import add_norm_mlp, add_norm_mlp_residual, is_fusable, norm_mlp
from vpt_fast.ops.rms_norm import is_rms_norm, rms_norm
from vpt_fast.ops.rope import rope_
from vpt_fast.ops.swiglu import is_swiglu_mlp, swiglu_mlp


def residual_mlp(block: nn.Module, residual: Tensor, branch: Tensor, backend: str,
                 ls1: BranchScale = None, ls2: BranchScale = None) -> Tensor:
    """timm's pre-norm block after attention, for ViT, Eva and Swin blocks (`block.norm2`, `.mlp`,
    `.drop_path1`, `.drop_path2`, `.recompute`): x = residual + drop_path1(ls1(branch)), then
    x + drop_path2(ls2(mlp(norm2(x)))); `ls1`, `ls2`: timm LayerScale modules, Eva's gamma vectors,
    or None (no scale). When drop_path1 is an identity and ls1 an identity or frozen, the add runs
    inside norm2's kernels (`add_norm_mlp`, `add_layer_norm`), and the sum may be written into
    `branch`: callers hand over a fresh tensor that nothing else reads (the attention's output).
    Without gradients and with no ls2, the second add accumulates into that buffer too
    (`add_norm_mlp_residual`)."""
    foldable, scale = branch_scale(ls1, block.drop_path1)
    recompute_fc1 = block.recompute == "mlp"
    if not foldable:
        x = residual + block.drop_path1(scaled(ls1, branch))
        if is_fusable(block.norm2, block.mlp):
            y = norm_mlp(x, block.norm2, block.mlp, recompute_fc1, backend)
        else:
            y = run_mlp(apply_norm(x, block.norm2, backend, feeds_matmul=True), block.mlp, backend, recompute_fc1)
    elif is_fusable(block.norm2, block.mlp):
        if (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and (ls2 is None or isinstance(
                ls2, nn.Identity)) and is_identity_drop_path(block.drop_path2)):  # inference: both adds in place
            return add_norm_mlp_residual(residual, branch, scale, block.norm2, block.mlp, backend)
        x, y = add_norm_mlp(residual, branch, scale, block.norm2, block.mlp, recompute_fc1, backend, reuse_branch=True)
    elif isinstance(block.norm2, nn.LayerNorm):
        x, xn = add_layer_norm(residual, branch, block.norm2, backend, scale)
        y = run_mlp(xn, block.mlp, backend, recompute_fc1)
    else:
        x = residual + (branch if scale is None else branch * scale)
        y = run_mlp(apply_norm(x, block.norm2, backend, feeds_matmul=True), block.mlp, backend, recompute_fc1)
    return x + block.drop_path2(scaled(ls2, y))


BranchScale = Union[nn.Module, Tensor, None]
"""A residual branch's scale: a timm LayerScale module (ViT `ls1`), a gamma vector (Eva `gamma_1`) or None."""


def scaled(ls: BranchScale, y: Tensor) -> Tensor:
    if ls is None:
        return y
    return ls * y if isinstance(ls, Tensor) else ls(y)


def check_norm(norm: nn.Module, name: str, identity: bool = False) -> None:
    """A block's norm must be one the prompt-aware path runs exactly: LayerNorm or RmsNorm over the
    last dim (or an identity where timm makes the norm optional)."""
    if isinstance(norm, nn.LayerNorm) or (identity and isinstance(norm, nn.Identity)):
        return
    if not is_rms_norm(norm):
        allowed = "nn.LayerNorm, timm RmsNorm" + (" or nn.Identity" if identity else "")
        raise TypeError(f"expected {name} to be {allowed}, got {type(norm).__module__}.{type(norm).__name__}")


def check_mlp(mlp: nn.Module) -> None:
    """timm's Mlp, SwiGLU or GluMlp: the MLPs of the supported families."""
    from timm.layers import GluMlp, Mlp, SwiGLU
    if type(mlp) not in (Mlp, SwiGLU, GluMlp):
        raise TypeError(f"expected the block's mlp to be timm Mlp, SwiGLU or GluMlp, got "
                        f"{type(mlp).__module__}.{type(mlp).__name__}")


def apply_norm(x: Tensor, norm: nn.Module, backend: str, feeds_matmul: bool = False) -> Tensor:
    """A frozen LayerNorm or RmsNorm through its op (an identity returns x)."""
    if isinstance(norm, nn.Identity):
        return x
    if isinstance(norm, nn.LayerNorm):
        return layer_norm(x, norm, backend, feeds_matmul=feeds_matmul)
    return rms_norm(x, norm, backend, feeds_matmul=feeds_matmul)


def run_mlp(x: Tensor, mlp: nn.Module, backend: str, recompute: bool) -> Tensor:
    """A frozen MLP on normalised rows: SwiGLU / GluMlp through the `swiglu` op, others as timm runs them."""
    if is_swiglu_mlp(mlp):
        return swiglu_mlp(x, mlp, backend, recompute=recompute)
    return mlp(x)


def rotate_patch_rows(t: Tensor, rope: Tensor, num_prefix_tokens: int, half: bool, backend: str) -> Tensor:
    """timm's rotary embedding on the rows of t (B, H, N, d) after the prefix, written in place by the
    `rope` op with `backend`'s primitives (t's dtype kept): `rope` holds the rows after the prefix
    (dim -2), of which the first N - num_prefix_tokens are used (a query slice of the first rows needs
    only theirs). Returns t, or a rotated copy where autograd cannot follow an in-place write
    (`vpt_fast.ops.rope.rope_`); use the returned tensor."""
    return rope_(t, rope, num_prefix_tokens, half, backend)


def pad_rope_rows(rope: Tensor, num_prompts: int) -> Tensor:
    """The rotary embedding of [prompts, patches]: P identity rows (sin 0, cos 1, timm's layout
    `cat(sin, cos)` on the last dim) before the patches' rows; rotating by them changes nothing."""
    shape = list(rope.shape)
    shape[-2] = num_prompts
    half = rope.shape[-1] // 2
    identity = torch.cat([rope.new_zeros(shape[:-1] + [half]), rope.new_ones(shape[:-1] + [rope.shape[-1] - half])],
                         dim=-1)
    return torch.cat([identity, rope], dim=-2)


def strip_rope_rows(rope: Tensor, num_prompts: int) -> Tensor:
    """`pad_rope_rows` undone: the patches' rows."""
    return rope.narrow(-2, num_prompts, rope.shape[-2] - num_prompts)


_GLOBAL_HOOKS_BEFORE_MEASUREMENT: list[frozenset[int]] = []
"""Ids of the global module hooks present when each open `ignore_measurement_hooks` context began."""


def _global_hook_ids() -> set[int]:
    return set(torch_module._global_forward_hooks) | set(torch_module._global_forward_pre_hooks)


def _foreign_global_hooks() -> bool:
    """Whether global forward (pre-)hooks other than an open measurement's are registered."""
    if not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks):
        return False  # the common case, checked every forward: no sets built
    if not _GLOBAL_HOOKS_BEFORE_MEASUREMENT:
        return True
    return bool(_global_hook_ids() & _GLOBAL_HOOKS_BEFORE_MEASUREMENT[0])  # those before the outermost one


@contextlib.contextmanager
def ignore_measurement_hooks() -> Iterator[None]:
    """Global module hooks registered inside this context belong to a measurement that does not need
    the fused blocks' submodules to be called (FlopCounterMode's module tracker only attributes
    FLOPs to modules: its breakdown then stops at the block, the total is exact), so the hook warning
    of `warn_if_hooks_bypassed` leaves them out. Global hooks registered before it still warn."""
    _GLOBAL_HOOKS_BEFORE_MEASUREMENT.append(frozenset(_global_hook_ids()))
    try:
        yield
    finally:
        _GLOBAL_HOOKS_BEFORE_MEASUREMENT.pop()


def warn_if_hooks_bypassed(block: nn.Module, backend: str) -> None:
    """Prompt-aware blocks run their submodules' weights through fused ops instead of calling the
    submodules, so forward/backward hooks on them (Grad-CAM, activation statistics) would silently
    not fire: warn, naming them, at the line that called the model. Hooks on the block itself run
    as usual. Runs every forward, so the common case (no hooks) is a walk of the hook dicts without
    building names."""
    def hooked(module: nn.Module) -> bool:
        return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or module._backward_pre_hooks)
    stack = list(block._modules.values())
    while stack and not any(m is not None and hooked(m) for m in stack):
        stack = [c for m in stack if m is not None for c in m._modules.values()]
    names = [name for name, m in block.named_modules() if name and hooked(m)] if stack else []
    if _foreign_global_hooks():
        names.append("(global module hooks)")
    if names:
        warnings.warn(f"hooks on {', '.join(sorted(names))} of a {type(block).__name__} do not run with backend "
                      f"{backend!r}: prompt-aware blocks apply those modules' weights in fused ops without "
                      f"calling them. Hooks on the block itself run; set_backend(model, 'reference') runs "
                      f"timm's modules and their hooks", stacklevel=stacklevel_outside_libraries())


def stacklevel_outside_libraries() -> int:
    """The `stacklevel` for a warning raised by our caller that points at the first frame outside
    vpt_fast, timm and torch: the user's line that called the model (or block), whatever the depth
    of the module calls in between."""
    import timm
    package_dirs = (os.path.dirname(torch.__file__), os.path.dirname(timm.__file__),
                    os.path.dirname(os.path.dirname(__file__)))
    library_dirs = tuple(os.path.join(os.path.abspath(path), "") for path in package_dirs)
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(library_dirs):
        level, frame = level + 1, frame.f_back
    return level


def is_identity_drop_path(drop_path: nn.Module) -> bool:
    """An `nn.Identity`, or timm's `DropPath` while it is inactive: in eval mode (which the frozen
    backbone keeps) or with probability 0."""
    from timm.layers import DropPath
    return isinstance(drop_path, nn.Identity) or (
        isinstance(drop_path, DropPath) and (not drop_path.training or drop_path.drop_prob == 0.0))


def branch_scale(ls: BranchScale, drop_path: nn.Module) -> tuple[bool, Optional[Tensor]]:
    """Whether `drop_path(ls(branch))` is `branch * scale` with a frozen per-channel `scale`, and that
    scale (None: no scaling). True for an identity drop path with no `ls` (None), an identity, a
    frozen timm LayerScale or a frozen gamma vector."""
    from timm.layers import LayerScale
    if is_identity_drop_path(drop_path) and (ls is None or isinstance(ls, nn.Identity)):
        return True, None
    if is_identity_drop_path(drop_path) and type(ls) is LayerScale and not ls.gamma.requires_grad:
        return True, ls.gamma
    if is_identity_drop_path(drop_path) and isinstance(ls, Tensor) and not ls.requires_grad:
        return True, ls
    return False, None


class PromptKV(NamedTuple):
    """Prompt keys and values (S, H, P, d), as `ViTBlock.prompt_kv` computes them."""
    k: Tensor
    v: Tensor


class PromptQKV(NamedTuple):
    """Prompt queries, keys and values (S, H, P, d), as `ViTBlock.prompt_qkv` and
    `SwinBlock.prompt_qkv` compute them; q is None where the prompt outputs are not needed."""
    q: Optional[Tensor]
    k: Tensor
    v: Tensor


def prompt_tensors(prompts) -> tuple[Tensor, ...]:
    if prompts is None:
        return ()
    return tuple(prompts) if isinstance(prompts, PromptKV) else (prompts,)
