"""ViTBlock: a drop-in, prompt-aware replacement for timm's ViT `Block` (VPT, arXiv 2203.12119).

The block keeps timm's own submodules (so state_dict keys do not change) and takes its prompt rows
separately from the token rows:

    out = block(x, prompts)     # x (B, N, D) token rows, prompts (Bp, P, D) with Bp in {1, B} or None

and returns the token rows only: the prompt rows' outputs are thrown away, as deep VPT replaces them
before the next block (docs/design.md §1). With `prompts=None` it is timm's block. Backends:
- "reference": release-style eager — concatenate [prefix, prompts, patches], run timm's own block
  math, drop the prompt rows;
- "torch" / "triton" / "cuda": the prompt-aware algorithm (docs/design.md §2): prompt LayerNorm and K/V
  computed once per prompt batch (Bp = 1 when shared), no prompt queries/attention rows/MLP,
  frozen-backbone ops that compute and save only what input gradients need.
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
from torch.utils.checkpoint import checkpoint

from vpt_fast.backends import resolve_auto, validate_backend
from vpt_fast.config import RECOMPUTE
from vpt_fast.ops.add_layer_norm import add_layer_norm
from vpt_fast.ops.attention import attention, attention_qkv, gather_prompt_sets
from vpt_fast.ops.layer_norm import layer_norm
from vpt_fast.ops.linear import linear
from vpt_fast.ops.mlp import add_norm_mlp, add_norm_mlp_residual, is_fusable, norm_mlp


class ViTBlock(nn.Module):
    """Prompt-aware timm ViT block.

    Args:
        block: a timm `vision_transformer.Block` whose submodules are taken over (not copied).
        num_prefix_tokens: class + register tokens at the start of the sequence; the reference
            backend inserts prompts after them.
        backend: one of `vpt_fast.backends.BACKENDS`.
        recompute: "none", "mlp" or "block" (see `PromptConfig`).
    """

    is_vpt_block = True  # set_backend() switches every module carrying this flag

    def __init__(self, block: nn.Module, num_prefix_tokens: int = 1, backend: str = "auto",
                 recompute: str = "none") -> None:
        super().__init__()
        from timm.models.vision_transformer import Block
        if type(block) is not Block:
            raise TypeError(f"ViTBlock.from_timm expects timm.models.vision_transformer.Block, "
                            f"got {type(block).__module__}.{type(block).__name__}")
        attn = block.attn
        from timm.layers import Attention
        if type(attn) is not Attention:  # e.g. DiffAttention (attn_layer='diff'): other arithmetic
            raise TypeError(f"ViTBlock supports timm.layers.Attention, got {type(attn).__module__}."
                            f"{type(attn).__name__}")
        if getattr(attn, "gate", None) is not None:
            raise TypeError("gated attention (timm Attention(gated=True)) is not supported")
        if not isinstance(attn.qkv, nn.Linear):
            raise TypeError(f"expected attn.qkv to be nn.Linear, got {type(attn.qkv).__name__}")
        for name in ("norm1", "norm2"):
            if not isinstance(getattr(block, name), nn.LayerNorm):
                raise TypeError(f"expected block.{name} to be nn.LayerNorm, got {type(getattr(block, name)).__name__}")
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2
        self.num_prefix_tokens = num_prefix_tokens
        self.backend = validate_backend(backend)
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
        self.recompute = recompute

    @classmethod
    def from_timm(cls, block: nn.Module, **kwargs) -> "ViTBlock":
        return cls(block, **kwargs)

    def forward(self, x: Tensor, prompts: Union[Tensor, PromptKV, None] = None, query_rows: Optional[int] = None,
                prompt_index: Optional[Tensor] = None) -> Tensor:
        """x (B, N, D) token rows -> token rows (B, N, D).

        Args:
            prompts: the prompt rows (Bp, P, D) with Bp in {1, B}, or (S, P, D) prompt sets read by
                `prompt_index`; or their keys and values already computed by `prompt_kv` (a cache,
                prompt-aware backends only); or None (timm's block).
            query_rows: return the first r rows only (B, r, D): every row still gives keys and
                values, but queries, attention rows, projection and MLP run for those r rows only
                (the last block of a model whose head reads the class token). The reference backend
                computes every row and slices, as the released code does.
            prompt_index: (B,) integer tensor, sample b reads prompt set `prompt_index[b]` (values in
                [0, S), not range-checked per block: `PromptBank` checks task ids once).
        """
        backend = resolve_auto(self.backend, x.device)
        if backend != "reference":
            warn_if_hooks_bypassed(self, backend)
        if isinstance(prompts, PromptKV):
            if backend == "reference":
                raise ValueError("precomputed prompt keys/values need a prompt-aware backend, not 'reference'")
        elif prompts is not None:
            sets = prompts.shape[0] if prompt_index is not None else x.shape[0]
            if prompts.dim() != 3 or prompts.shape[0] not in (1, sets) or prompts.shape[2] != x.shape[2]:
                raise ValueError(f"prompts must be (1 or {'S' if prompt_index is not None else 'B'}={sets}, P, "
                                 f"D={x.shape[2]}), got {tuple(prompts.shape)}")
        if query_rows is not None and not 1 <= query_rows <= x.shape[1]:
            raise ValueError(f"query_rows must be in [1, N={x.shape[1]}], got {query_rows}")
        if backend == "reference":
            if prompt_index is not None:
                prompts = gather_prompt_sets(prompts, prompt_index)  # release-style: every sample its own rows
            run, args = self._reference_rows, (x, prompts, query_rows)
        else:
            run, args = self._forward, (x, prompts, backend, query_rows, prompt_index)
        # "block" (and timm's set_grad_checkpointing) applies to every backend, the reference included
        if self.recompute == "block" and torch.is_grad_enabled() and (x.requires_grad or any(
                t.requires_grad for t in _tensors(prompts))):
            return checkpoint(run, *args, use_reentrant=False)
        return run(*args)

    def _reference_rows(self, x: Tensor, prompts: Optional[Tensor], query_rows: Optional[int]) -> Tensor:
        out = self.forward_reference(x, prompts)
        return out if query_rows is None else out[:, :query_rows]

    def forward_reference(self, x: Tensor, prompts: Optional[Tensor] = None) -> Tensor:
        """Release-style VPT: timm's block on [prefix, prompts, patches], prompt rows dropped."""
        if prompts is None:
            return self._timm_forward(x)
        npfx, num_prompts = self.num_prefix_tokens, prompts.shape[1]
        full = torch.cat([x[:, :npfx], prompts.expand(x.shape[0], -1, -1), x[:, npfx:]], dim=1)
        out = self._timm_forward(full)
        return torch.cat([out[:, :npfx], out[:, npfx + num_prompts:]], dim=1)

    def _timm_forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _forward(self, x: Tensor, prompts, backend: str, query_rows: Optional[int] = None,
                 prompt_index: Optional[Tensor] = None) -> Tensor:
        residual = x if query_rows is None else x[:, :query_rows]
        branch = self._attention(x, prompts, backend, query_rows, prompt_index)
        return residual_mlp(self, residual, branch, backend, self.ls1, self.ls2)

    def prompt_kv(self, prompts: Tensor, backend: str) -> PromptKV:
        """Prompt rows (S, P, D) -> their keys and values (S, H, P, d): norm1, the K/V rows of the qkv
        projection, k-norm. Prompt rows need nothing else: their queries and outputs are discarded."""
        attn, backend = self.attn, resolve_auto(backend, prompts.device)
        kv = linear(layer_norm(prompts, self.norm1, backend, feeds_matmul=True),
                    *_rows_of(attn.qkv, attn.attn_dim, 3 * attn.attn_dim))
        pk, pv = kv.view(prompts.shape[0], prompts.shape[1], 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return PromptKV(self._qk_norm(pk, attn.k_norm, backend), pv)

    def _attention(self, x: Tensor, prompts, backend: str, query_rows: Optional[int] = None,
                   prompt_index: Optional[Tensor] = None) -> Tensor:
        attn = self.attn
        batch, num_tokens, dim = x.shape
        heads, head_dim, attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        xn = layer_norm(x, self.norm1, backend, feeds_matmul=True)
        pk, pv = (None, None) if prompts is None else (
            prompts if isinstance(prompts, PromptKV) else self.prompt_kv(prompts, backend))
        # the index comes checked from the model (PromptBank checks task ids once): no per-block sync
        options = dict(scale=attn.scale, backend=backend, prompt_index=prompt_index, check_index_range=False)
        plain_qk = isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
        if query_rows is None and plain_qk:  # q, k, v as one tensor: its gradient is one buffer, no stacking
            qkv = linear(xn, attn.qkv.weight, attn.qkv.bias).view(batch, num_tokens, 3, heads, head_dim)
            o = attention_qkv(qkv, pk, pv, **options)
        else:
            if query_rows is None:
                qkv = linear(xn, attn.qkv.weight, attn.qkv.bias)
                q, k, v = qkv.view(batch, num_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            else:  # every row gives keys and values, only the first `query_rows` rows ask queries
                q = linear(xn[:, :query_rows], *_rows_of(attn.qkv, 0, attn_dim))
                q = q.view(batch, query_rows, heads, head_dim).transpose(1, 2)
                kv = linear(xn, *_rows_of(attn.qkv, attn_dim, 3 * attn_dim))
                k, v = kv.view(batch, num_tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
            q, k = self._qk_norm(q, attn.q_norm, backend), self._qk_norm(k, attn.k_norm, backend)
            o = attention(q, k, v, pk, pv, **options)
        o = o.transpose(1, 2).reshape(batch, o.shape[2], attn_dim)
        if not isinstance(attn.norm, nn.Identity):
            o = layer_norm(o, attn.norm, backend, feeds_matmul=True)
        return linear(o, attn.proj.weight, attn.proj.bias)

    @staticmethod
    def _qk_norm(t: Tensor, norm: nn.Module, backend: str) -> Tensor:
        return t if isinstance(norm, nn.Identity) else layer_norm(t, norm, backend, feeds_matmul=True)

    def prompt_qkv(self, prompts: Tensor, backend: str) -> PromptQKV:
        """Prompt rows (S, P, D) -> their queries, keys and values (S, H, P, d): norm1, the qkv
        projection, qk-norm. Shallow VPT's block 0 needs all three: there the prompt rows are
        ordinary tokens whose outputs continue through the later blocks."""
        attn, backend = self.attn, resolve_auto(backend, prompts.device)
        qkv = linear(layer_norm(prompts, self.norm1, backend, feeds_matmul=True), attn.qkv.weight, attn.qkv.bias)
        q, k, v = qkv.view(prompts.shape[0], prompts.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return PromptQKV(self._qk_norm(q, attn.q_norm, backend), self._qk_norm(k, attn.k_norm, backend), v)

    def forward_prompt_rows(self, x: Tensor, prompt_qkv: PromptQKV, prompt_start: int,
                            query_rows: Optional[int] = None, prompt_index: Optional[Tensor] = None) -> Tensor:
        """Timm's block on x (B, N, D) whose rows [prompt_start, prompt_start + P) are prompt rows
        with their queries, keys and values already computed by `prompt_qkv` (a cache: shallow VPT's
        block 0 without gradients). norm1 and the qkv projection run on the other rows only; the
        prompt rows' outputs are returned like any row's (B, N, D), or the first `query_rows` rows.

        Args:
            prompt_qkv: (Bp, H, P, d) each with Bp in {1, B}, or (S, H, P, d) sets read by `prompt_index`.
            prompt_start: index of the first prompt row (the number of prefix tokens).
            query_rows, prompt_index: as in `forward`.
        """
        backend = resolve_auto(self.backend, x.device)
        if backend == "reference":
            raise ValueError("precomputed prompt queries/keys/values need a prompt-aware backend, not 'reference'")
        attn = self.attn
        end = prompt_start + prompt_qkv.k.shape[2]
        sets = x.shape[0] if prompt_index is None else prompt_qkv.k.shape[0]
        if (prompt_qkv.k.dim() != 4 or prompt_qkv.k.shape[0] not in (1, sets) or end > x.shape[1]
                or any(t.shape != prompt_qkv.k.shape for t in prompt_qkv)):
            raise ValueError(f"prompt_qkv must be three (1 or {'S' if prompt_index is not None else 'B'}={sets}, H, "
                             f"P, d) tensors with prompt_start + P <= N={x.shape[1]}, got "
                             f"{[tuple(t.shape) for t in prompt_qkv]} and prompt_start={prompt_start}")
        if query_rows is not None and not 1 <= query_rows <= x.shape[1]:
            raise ValueError(f"query_rows must be in [1, N={x.shape[1]}], got {query_rows}")
        own = torch.cat([x[:, :prompt_start], x[:, end:]], dim=1)  # every row but the prompts
        batch, num_own, _ = own.shape
        qkv = linear(layer_norm(own, self.norm1, backend, feeds_matmul=True), attn.qkv.weight, attn.qkv.bias)
        q, k, v = qkv.view(batch, num_own, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self._qk_norm(q, attn.q_norm, backend), self._qk_norm(k, attn.k_norm, backend)
        pq = prompt_qkv.q
        pq = pq.expand(batch, -1, -1, -1) if prompt_index is None else gather_prompt_sets(pq, prompt_index)
        # queries in row order; the prompt keys/values are the attention op's shared prompt segment
        q = torch.cat([q[:, :, :prompt_start], pq, q[:, :, prompt_start:]], dim=2)[:, :, :query_rows]
        # the index comes checked from the model (PromptBank checks task ids once): no per-block sync
        o = attention(q, k, v, prompt_qkv.k, prompt_qkv.v, scale=attn.scale, backend=backend,
                      prompt_index=prompt_index, check_index_range=False)
        o = o.transpose(1, 2).reshape(batch, q.shape[2], attn.attn_dim)
        if not isinstance(attn.norm, nn.Identity):
            o = layer_norm(o, attn.norm, backend, feeds_matmul=True)
        return residual_mlp(self, x[:, :query_rows], linear(o, attn.proj.weight, attn.proj.bias), backend,
                            self.ls1, self.ls2)


def residual_mlp(block: nn.Module, residual: Tensor, branch: Tensor, backend: str,
                 ls1: Optional[nn.Module] = None, ls2: Optional[nn.Module] = None) -> Tensor:
    """timm's pre-norm block after attention, for ViT and Swin blocks (`block.norm2`, `.mlp`,
    `.drop_path1`, `.drop_path2`, `.recompute`): x = residual + drop_path1(ls1(branch)), then
    x + drop_path2(ls2(mlp(norm2(x)))); `ls1`, `ls2` None: no LayerScale (Swin). When drop_path1 is
    an identity and ls1 an identity or a frozen LayerScale, the add runs inside norm2's kernels
    (`add_norm_mlp`, `add_layer_norm`), and the sum may be written into `branch`: callers hand over a
    fresh tensor that nothing else reads (the attention's output). Without gradients and with no ls2,
    the second add accumulates into that buffer too (`add_norm_mlp_residual`)."""
    foldable, scale = _branch_scale(ls1, block.drop_path1)
    recompute_fc1 = block.recompute == "mlp"
    if not foldable:
        x = residual + block.drop_path1(branch if ls1 is None else ls1(branch))
        if is_fusable(block.norm2, block.mlp):
            y = norm_mlp(x, block.norm2, block.mlp, recompute_fc1, backend)
        else:
            y = block.mlp(layer_norm(x, block.norm2, backend))
    elif is_fusable(block.norm2, block.mlp):
        if (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and (ls2 is None or isinstance(
                ls2, nn.Identity)) and is_identity_drop_path(block.drop_path2)):  # inference: both adds in place
            return add_norm_mlp_residual(residual, branch, scale, block.norm2, block.mlp, backend)
        x, y = add_norm_mlp(residual, branch, scale, block.norm2, block.mlp, recompute_fc1, backend, reuse_branch=True)
    else:
        x, xn = add_layer_norm(residual, branch, block.norm2, backend, scale)
        y = block.mlp(xn)
    return x + block.drop_path2(y if ls2 is None else ls2(y))


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
                      f"timm's modules and their hooks", stacklevel=_stacklevel_outside_libraries())


def _stacklevel_outside_libraries() -> int:
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


def _branch_scale(ls: Optional[nn.Module], drop_path: nn.Module) -> tuple[bool, Optional[Tensor]]:
    """Whether `drop_path(ls(branch))` is `branch * scale` with a frozen per-channel `scale`, and that
    scale (None: no scaling). True for an identity drop path with no `ls` (None), an identity or a
    frozen timm LayerScale."""
    from timm.layers import LayerScale
    if is_identity_drop_path(drop_path) and (ls is None or isinstance(ls, nn.Identity)):
        return True, None
    if is_identity_drop_path(drop_path) and type(ls) is LayerScale and not ls.gamma.requires_grad:
        return True, ls.gamma
    return False, None


def _rows_of(layer: nn.Linear, start: int, stop: int) -> tuple[Tensor, Optional[Tensor]]:
    """Output rows [start, stop) of a Linear: (weight, bias) views."""
    return layer.weight[start:stop], None if layer.bias is None else layer.bias[start:stop]


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


def _tensors(prompts) -> tuple[Tensor, ...]:
    if prompts is None:
        return ()
    return tuple(prompts) if isinstance(prompts, PromptKV) else (prompts,)
