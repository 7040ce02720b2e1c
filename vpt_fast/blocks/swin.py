"""SwinBlock, SwinPatchMerging: prompt-aware replacements for timm's Swin `SwinTransformerBlock` and
`PatchMerging` (VPT, arXiv 2203.12119; Swin, arXiv 2103.14030).

Both keep timm's own submodules (state_dict keys do not change) and take the prompt rows separately
from the NHWC token grid:

    x = block(x)                                  # timm's block (through the chosen backend)
    x, p = block(x, prompts, need_prompts=True)   # x (B, H, W, C), prompts (Bp, P, C), Bp in {1, B}
    x, p = merging(x, prompts)                    # prompts repeated [p, p, p, p], norm, reduction
    qkv = block.prompt_qkv(prompts, "torch")      # the prompts' norm1 + q/k/v, e.g. cached once
    x, p = block(x, prompts, need_prompts=True, prompt_qkv=qkv)

Semantics (docs/design.md §1 "Swin"): the prompts of an image go through `norm1`, join every attention
window of that image as extra keys/values and queries with zero relative-position bias and zero
shift mask for every pair involving a prompt; a prompt's attention output is the mean over the
windows of its image; then residual, `norm2` and MLP as for any token. Backends:
- "reference": release-style eager, per-sample correct: prompts concatenated to every window as
  extra rows, timm's attention math on the joint rows; prompt outputs are always computed;
- "torch" / "triton" / "cuda": prompt-aware (docs/design.md §2): prompt `norm1` and K/V computed once
  per prompt batch (Bp = 1 for deep prompts shared by the batch) and read by every window through
  the attention op's prompt segment (query batch b = image * nW + window reads prompt batch
  b // (B * nW // Bp), no nW copies); relative-position bias and shift mask enter through the op's
  `bias` hook (own keys only), built once per grid and cached while the bias table is unchanged;
  prompt queries, output projection and MLP run only when `need_prompts` (deep VPT needs them in
  the last block only), the projection once per image on the window-mean (it is affine, so this
  equals the mean of the projected windows). The prompts' norm1 and q/k/v projection depend on the
  prompts alone, so a caller may compute them once (`prompt_qkv`) and pass them in: without gradients
  the prompted model caches them for every block whose prompts are parameters (deep VPT: every block;
  shallow: the first).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vpt_fast.backends import resolve_auto, validate_backend
from vpt_fast.blocks.common import PromptQKV, residual_mlp, warn_if_hooks_bypassed
from vpt_fast.config import RECOMPUTE
from vpt_fast.ops.attention import attention
from vpt_fast.ops.layer_norm import layer_norm
from vpt_fast.ops.linear import linear
from vpt_fast.ops.windows import window_index, window_partition, window_reverse

# timm SwinTransformerBlock attributes that its window/shift/mask bookkeeping reads.
_TIMM_ATTRS = ("dim", "input_resolution", "target_shift_size", "always_partition", "dynamic_mask",
               "window_size", "shift_size", "window_area", "mlp_ratio")


def _timm_swin():
    from timm.models import swin_transformer
    return swin_transformer


def _check_recompute(recompute: str) -> str:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    return recompute


def _check_prompts(prompts: Tensor, batch: int, dim: int) -> None:
    if prompts.dim() != 3 or prompts.shape[0] not in (1, batch) or prompts.shape[2] != dim:
        raise ValueError(f"prompts must be (1 or B={batch}, P, C={dim}), got {tuple(prompts.shape)}")


def _snapshot(t: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor, int]]:
    """What `_unchanged` compares: the object, an alias of its current storage (kept alive, so a
    new storage cannot reuse its address) and its version counter."""
    return None if t is None else (t, t.detach(), t._version)


def _unchanged(t: Optional[Tensor], snapshot: Optional[tuple[Tensor, Tensor, int]]) -> bool:
    if t is None or snapshot is None:
        return t is None and snapshot is None
    obj, alias, version = snapshot
    return (t is obj and t._version == version and t.data_ptr() == alias.data_ptr()
            and t.dtype == alias.dtype and t.device == alias.device and t.shape == alias.shape)


class SwinBlock(nn.Module):
    """Prompt-aware timm Swin block (docs/design.md §1 "Swin", §2).

    Args:
        block: a timm `swin_transformer.SwinTransformerBlock` whose submodules are taken over.
        backend: one of `vpt_fast.backends.BACKENDS`.
        recompute: "none", "mlp" or "block" (see `PromptConfig`).
    """

    is_vpt_block = True  # set_backend() switches every module carrying this flag

    def __init__(self, block: nn.Module, backend: str = "auto", recompute: str = "none") -> None:
        super().__init__()
        swin = _timm_swin()
        if type(block) is not swin.SwinTransformerBlock:
            raise TypeError(f"SwinBlock.from_timm expects timm.models.swin_transformer.SwinTransformerBlock, "
                            f"got {type(block).__module__}.{type(block).__name__}")
        if type(block.attn) is not swin.WindowAttention or not isinstance(block.attn.qkv, nn.Linear):
            raise TypeError(f"expected block.attn to be timm WindowAttention with an nn.Linear qkv, "
                            f"got {type(block.attn).__name__}")
        for name in ("norm1", "norm2"):
            norm = getattr(block, name)
            if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
                raise TypeError(f"expected block.{name} to be nn.LayerNorm, got {type(norm).__name__}")
        for name in _TIMM_ATTRS:
            setattr(self, name, getattr(block, name))
        self.norm1, self.attn, self.drop_path1 = block.norm1, block.attn, block.drop_path1
        self.norm2, self.mlp, self.drop_path2 = block.norm2, block.mlp, block.drop_path2
        self.register_buffer("attn_mask", block.attn_mask, persistent=False)
        self.backend = validate_backend(backend)
        self.recompute = _check_recompute(recompute)
        self._window_cache: dict[tuple, tuple[Tensor, Tensor]] = {}  # see _window_maps
        self._bias_cache: dict[tuple, tuple[tuple, Tensor]] = {}  # see _bias

    @classmethod
    def from_timm(cls, block: nn.Module, **kwargs) -> "SwinBlock":
        return cls(block, **kwargs)

    def __getstate__(self) -> dict:
        # the caches are derived from the weights and rebuilt on demand: not part of a pickle or deepcopy
        return {**super().__getstate__(), "_window_cache": {}, "_bias_cache": {}}

    # timm's window / shift / mask bookkeeping, reused as is (it reads only the attributes above),
    # so `SwinTransformer.set_input_size` keeps working on a prompted model.
    def get_attn_mask(self, x: Optional[Tensor] = None, device=None, dtype=None) -> Optional[Tensor]:
        return _timm_swin().SwinTransformerBlock.get_attn_mask(self, x, device, dtype)

    def _calc_window_shift(self, target_window_size, target_shift_size=None):
        return _timm_swin().SwinTransformerBlock._calc_window_shift(self, target_window_size, target_shift_size)

    def _init_buffers(self) -> None:
        _timm_swin().SwinTransformerBlock._init_buffers(self)

    def init_non_persistent_buffers(self) -> None:
        self._init_buffers()

    def set_input_size(self, feat_size, window_size, always_partition=None) -> None:
        _timm_swin().SwinTransformerBlock.set_input_size(self, feat_size, window_size, always_partition)

    # -- shared helpers ------------------------------------------------------------------------
    def _window_maps(self, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """`window_index` maps for this grid, built once per size, window, shift and device (the
        key follows `set_input_size` and inputs of other sizes)."""
        if torch.compiler.is_compiling():
            # built inside the graph (a few aranges): filling the cache there would force a recompile
            return window_index(height, width, self.window_size, self.shift_size, device)
        key = (height, width, self.window_size, self.shift_size, device)
        if key not in self._window_cache:
            # normal tensors even under torch.inference_mode: the gathers save them for backward later
            with torch.inference_mode(False):
                self._window_cache[key] = window_index(height, width, self.window_size, self.shift_size, device)
        return self._window_cache[key]

    def _to_windows(self, xn: Tensor) -> Tensor:
        """Normalised grid (B, H, W, C) -> windows (B*nW, N, C): timm's shift, padding and
        partition as one gather (`vpt_fast.ops.windows`)."""
        batch, height, width, dim = xn.shape
        index, inverse = self._window_maps(height, width, xn.device)
        windows = window_partition(xn.reshape(batch, height * width, dim), index, inverse)
        return windows.view(-1, self.window_area, dim)

    def _shift_mask(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Optional[Tensor]:
        """timm's shift mask (nW, N, N) for an (H, W) grid, or None without shift."""
        if not self.dynamic_mask:
            return self.attn_mask
        # timm's mask of the padded grid (get_attn_mask reads only its shape, device and dtype)
        wh, ww = self.window_size
        return self.get_attn_mask(torch.empty(0, -(-height // wh) * wh, -(-width // ww) * ww, 0,
                                              device=device, dtype=dtype))

    def _from_windows(self, windows: Tensor, height: int, width: int) -> Tensor:
        """(B*nW, N, C) -> (B, H, W, C): the inverse gather of `_to_windows`."""
        index, inverse = self._window_maps(height, width, windows.device)
        dim = windows.shape[-1]
        x = window_reverse(windows.reshape(-1, index.numel(), dim), index, inverse)
        return x.view(-1, height, width, dim)

    def _timm_to_windows(self, xn: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """`_to_windows` with timm's own ops (cyclic shift, zero padding, `window_partition`), for
        the reference backend."""
        swin = _timm_swin()
        _, height, width, dim = xn.shape
        if any(self.shift_size):
            xn = torch.roll(xn, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        pad_h = (self.window_size[0] - height % self.window_size[0]) % self.window_size[0]
        pad_w = (self.window_size[1] - width % self.window_size[1]) % self.window_size[1]
        xn = F.pad(xn, (0, 0, 0, pad_w, 0, pad_h))
        mask = self.get_attn_mask(xn) if self.dynamic_mask else self.attn_mask
        windows = swin.window_partition(xn, self.window_size).view(-1, self.window_area, dim)
        return windows, mask

    def _timm_from_windows(self, windows: Tensor, height: int, width: int) -> Tensor:
        """`_from_windows` with timm's own ops: `window_reverse`, crop the padding, undo the shift."""
        swin = _timm_swin()
        wh, ww = self.window_size
        hp, wp = -(-height // wh) * wh, -(-width // ww) * ww
        x = swin.window_reverse(windows.view(-1, wh, ww, windows.shape[-1]), self.window_size, hp, wp)
        x = x[:, :height, :width, :]
        if any(self.shift_size):
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, prompts: Optional[Tensor] = None, need_prompts: bool = True,
                prompt_qkv: Optional[PromptQKV] = None):
        """x (B, H, W, C); prompts (1 or B, P, C) or None.

        Returns x (B, H, W, C) when `prompts` is None (timm's block), else (x, prompt outputs): the
        prompt outputs are (B, P, C), or None when `need_prompts` is False and the backend is
        prompt-aware (deep VPT replaces them before the next block).

        Args:
            prompt_qkv: the prompts' queries, keys and values (1 or B, H, P, d) already computed by
                `prompt_qkv` (a cache; prompt-aware backends only); queries may be None when
                `need_prompts` is False. The block then runs no norm1 or projection on the prompts.
        """
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape (B, H, W, C={self.dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:  # timm's own Swin block fails on an empty batch too (in WindowAttention)
            raise ValueError(f"expected a batch of at least one image, got x of shape {tuple(x.shape)} (batch 0)")
        if prompts is not None:
            _check_prompts(prompts, x.shape[0], self.dim)
        backend = resolve_auto(self.backend, x.device)
        if backend != "reference":
            warn_if_hooks_bypassed(self, backend)
        table_needs_grad = self.attn.relative_position_bias_table.requires_grad
        if prompt_qkv is not None:
            self._check_prompt_qkv(prompt_qkv, prompts, x.shape[0], need_prompts)
            if backend == "reference" or table_needs_grad:
                raise ValueError("precomputed prompt queries/keys/values need a prompt-aware backend (not "
                                 "'reference') and a frozen relative-position bias table")
        if backend == "reference" or table_needs_grad:
            # (an unfrozen rel-pos table needs its gradient: the attention op gives none for `bias`)
            run, args = self.forward_reference, (x, prompts)
        else:
            run, args = self._forward, (x, prompts, need_prompts, backend, prompt_qkv)
        # "block" (and timm's set_grad_checkpointing) applies to every backend, the reference included
        if self.recompute == "block" and torch.is_grad_enabled() and (
                x.requires_grad or (prompts is not None and prompts.requires_grad)):
            x, p = checkpoint(run, *args, use_reentrant=False)
        else:
            x, p = run(*args)
        return x if prompts is None else (x, p)

    def _check_prompt_qkv(self, prompt_qkv: PromptQKV, prompts: Optional[Tensor], batch: int,
                          need_prompts: bool) -> None:
        heads = self.attn.num_heads
        head_dim = self.attn.qkv.out_features // 3 // heads
        num_prompts = None if prompts is None else prompts.shape[1]
        given = [t for t in prompt_qkv if t is not None]
        if (prompts is None or prompt_qkv.k.dim() != 4 or prompt_qkv.k.shape[0] not in (1, batch)
                or tuple(prompt_qkv.k.shape[1:]) != (heads, num_prompts, head_dim)
                or any(t.shape != prompt_qkv.k.shape for t in given) or (need_prompts and prompt_qkv.q is None)):
            raise ValueError(f"prompt_qkv must come with the prompts and hold (1 or B={batch}, H={heads}, "
                             f"P={num_prompts}, d={head_dim}) keys and values, and queries when need_prompts; "
                             f"got {[None if t is None else tuple(t.shape) for t in prompt_qkv]}")

    def forward_reference(self, x: Tensor, prompts: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Release-style VPT, per-sample correct: each image's prompts are concatenated to every
        window of that image, timm's attention math runs on the joint rows with zero bias and zero
        mask for prompt pairs, prompt outputs are averaged over the image's windows."""
        batch, height, width, dim = x.shape
        num_prompts = 0 if prompts is None else prompts.shape[1]
        windows, mask = self._timm_to_windows(self.norm1(x))
        num_windows = windows.shape[0] // batch
        if num_prompts:
            prompts = prompts.expand(batch, -1, -1)
            pn = self.norm1(prompts)
            # window w of image b gets image b's prompts (timm's window order is image-major)
            pn = pn.unsqueeze(1).expand(batch, num_windows, num_prompts, dim).reshape(-1, num_prompts, dim)
            windows = torch.cat([pn, windows], dim=1)
        out = self._reference_window_attention(windows, mask, num_prompts)
        x = x + self.drop_path1(self._timm_from_windows(out[:, num_prompts:], height, width))
        tokens = x.reshape(batch, height * width, dim)
        if num_prompts:
            p_attn = out[:, :num_prompts].reshape(batch, num_windows, num_prompts, dim).mean(1)
            tokens = torch.cat([prompts + self.drop_path1(p_attn), tokens], dim=1)
        tokens = tokens + self.drop_path2(self.mlp(self.norm2(tokens)))
        x = tokens[:, num_prompts:].reshape(batch, height, width, dim)
        return x, (tokens[:, :num_prompts] if num_prompts else None)

    def _reference_window_attention(self, x: Tensor, mask: Optional[Tensor], num_prompts: int) -> Tensor:
        """timm's WindowAttention math on [prompts, window] rows, bias and mask zero-padded."""
        attn = self.attn
        bw, n, _ = x.shape
        qkv = attn.qkv(x).reshape(bw, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        pad = (num_prompts, 0, num_prompts, 0)
        scores = scores + F.pad(attn._get_rel_pos_bias(), pad)
        if mask is not None:
            nw = mask.shape[0]
            scores = scores.view(-1, nw, attn.num_heads, n, n) + F.pad(mask, pad).unsqueeze(1).unsqueeze(0)
            scores = scores.view(-1, attn.num_heads, n, n)
        probs = attn.attn_drop(attn.softmax(scores))
        out = (probs @ v).transpose(1, 2).reshape(bw, n, -1)
        return attn.proj_drop(attn.proj(out))

    def _forward(self, x: Tensor, prompts: Optional[Tensor], need_prompts: bool, backend: str,
                 prompt_qkv: Optional[PromptQKV] = None) -> tuple[Tensor, Optional[Tensor]]:
        batch, height, width, dim = x.shape
        if prompts is not None and prompt_qkv is None:
            prompt_qkv = self.prompt_qkv(prompts, backend, queries=need_prompts)
        # norm1's outputs feed only the qkv GEMMs (window partition in between moves data only)
        a, pa = self._attention(layer_norm(x, self.norm1, backend, feeds_matmul=True), prompt_qkv, need_prompts,
                                backend)
        rows = (batch, height * width, dim)
        x = residual_mlp(self, x.reshape(rows), a.reshape(rows), backend).reshape(batch, height, width, dim)
        if pa is None:
            return x, None
        return x, residual_mlp(self, prompts.expand_as(pa), pa, backend)

    def _build_bias(self, height: int, width: int) -> Tensor:
        """Relative-position bias (1, H, N, N), plus the shift mask of an (H, W) grid: (nW, H, N, N);
        in the dtype and on the device of the bias table."""
        bias = self.attn._get_rel_pos_bias()
        mask = self._shift_mask(height, width, bias.device, bias.dtype)
        return bias if mask is None else bias + mask.unsqueeze(1).to(bias.dtype)

    def _bias_sources(self) -> tuple[Optional[Tensor], ...]:
        """The tensors `_build_bias` reads (timm replaces them on `set_window_size` / `set_input_size`)."""
        attn = self.attn
        return (attn.relative_position_bias_table, attn.relative_position_index,
                None if self.dynamic_mask else self.attn_mask)

    def _bias(self, height: int, width: int) -> Tensor:
        """`_build_bias`, built once per grid and reused while its sources are unchanged.

        An entry is reused only while every source is the same tensor object with the same storage,
        dtype, device and version counter, so `load_state_dict`, in-place updates, `.to(dtype)`,
        `.to(device)` and `set_input_size` all rebuild it (an in-place change through `.data`
        bypasses the version counter, as it bypasses autograd's checks: call `clear_caches()` then).
        A table that requires grad is never cached (its bias needs autograd), and under
        torch.compile the bias is built inside the graph (filling a cache there would recompile)."""
        table = self.attn.relative_position_bias_table
        if torch.compiler.is_compiling() or table.requires_grad:
            return self._build_bias(height, width)
        key = (height, width, self.window_size, self.shift_size)
        sources = self._bias_sources()
        entry = self._bias_cache.get(key)
        if entry is not None and all(_unchanged(t, snap) for t, snap in zip(sources, entry[0])):
            return entry[1]
        # a normal tensor without history even under torch.inference_mode (saved for backward later)
        with torch.inference_mode(False), torch.no_grad():
            bias = self._build_bias(height, width)
        self._bias_cache[key] = (tuple(_snapshot(t) for t in sources), bias)
        return bias

    def clear_caches(self) -> None:
        """Drop the cached window maps and attention biases (rebuilt on the next forward)."""
        self._window_cache.clear()
        self._bias_cache.clear()

    def prompt_qkv(self, prompts: Tensor, backend: str, queries: bool = True) -> PromptQKV:
        """Prompt rows (S, P, C) -> norm1, then their keys and values (S, H, P, d) and, with
        `queries`, their queries (else None): what every window of an image reads of its prompts."""
        attn, backend = self.attn, resolve_auto(backend, prompts.device)
        attn_dim = attn.qkv.out_features // 3
        parts = 3 if queries else 2
        pn = layer_norm(prompts, self.norm1, backend, feeds_matmul=True)
        start = (3 - parts) * attn_dim  # the key and value rows of qkv are its last 2 * attn_dim
        qkv = linear(pn, attn.qkv.weight[start:], None if attn.qkv.bias is None else attn.qkv.bias[start:])
        qkv = qkv.view(*prompts.shape[:2], parts, attn.num_heads, attn_dim // attn.num_heads).permute(2, 0, 3, 1, 4)
        return PromptQKV(qkv[0] if queries else None, qkv[-2], qkv[-1])

    def _attention(self, xn: Tensor, prompt_qkv: Optional[PromptQKV], need_prompts: bool,
                   backend: str) -> tuple[Tensor, Optional[Tensor]]:
        """Window attention of the normalised grid `xn` with the prompts' queries, keys and values
        (Bp, H, P, d): (token outputs (B, H, W, C), prompt outputs (B, P, C) or None)."""
        attn = self.attn
        batch, height, width, dim = xn.shape
        heads = attn.num_heads
        attn_dim = attn.qkv.out_features // 3
        head_dim = attn_dim // heads
        windows = self._to_windows(xn)
        bw, n, _ = windows.shape
        qkv = linear(windows, attn.qkv.weight, attn.qkv.bias)
        q, k, v = qkv.view(bw, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        pk, pv = (None, None) if prompt_qkv is None else prompt_qkv[1:]
        o = attention(q, k, v, pk, pv, scale=attn.scale, bias=self._bias(height, width), backend=backend)
        o = linear(o.transpose(1, 2).reshape(bw, n, attn_dim), attn.proj.weight, attn.proj.bias)
        out = self._from_windows(o, height, width)
        if prompt_qkv is None or not need_prompts:
            return out, None
        # Prompt queries attend, in every window of their image, to [prompts, window] with no bias.
        num_windows = bw // batch
        qp = prompt_qkv.q
        bp, _, num_prompts, _ = qp.shape
        if bp == 1:
            qp = qp.expand(bw, -1, -1, -1)  # a view: one query set read by every window
        else:
            qp = qp.unsqueeze(1).expand(bp, num_windows, heads, num_prompts, head_dim)
            qp = qp.reshape(bw, heads, num_prompts, head_dim)
        op = attention(qp, k, v, pk, pv, scale=attn.scale, backend=backend)
        op = op.view(batch, num_windows, heads, num_prompts, head_dim).mean(1)
        op = op.transpose(1, 2).reshape(batch, num_prompts, attn_dim)
        return out, linear(op, attn.proj.weight, attn.proj.bias)


class SwinPatchMerging(nn.Module):
    """Prompt-aware timm Swin `PatchMerging`: tokens merge 2x2 as in timm; prompts are repeated
    along channels ([p, p, p, p]) and go through the same norm and reduction (docs/design.md §1).

    Args:
        merging: a timm `swin_transformer.PatchMerging` whose norm and reduction are taken over.
        backend: one of `vpt_fast.backends.BACKENDS`.
        recompute: kept for `set_backend`; merging saves only LayerNorm inputs and statistics.
    """

    is_vpt_block = True

    def __init__(self, merging: nn.Module, backend: str = "auto", recompute: str = "none") -> None:
        super().__init__()
        if type(merging) is not _timm_swin().PatchMerging:
            raise TypeError(f"SwinPatchMerging.from_timm expects timm.models.swin_transformer.PatchMerging, "
                            f"got {type(merging).__module__}.{type(merging).__name__}")
        if not isinstance(merging.norm, nn.LayerNorm) or len(merging.norm.normalized_shape) != 1:
            raise TypeError(f"expected merging.norm to be nn.LayerNorm, got {type(merging.norm).__name__}")
        self.dim, self.out_dim = merging.dim, merging.out_dim
        self.norm, self.reduction = merging.norm, merging.reduction
        self.backend = validate_backend(backend)
        self.recompute = _check_recompute(recompute)

    @classmethod
    def from_timm(cls, merging: nn.Module, **kwargs) -> "SwinPatchMerging":
        return cls(merging, **kwargs)

    def forward(self, x: Tensor, prompts: Optional[Tensor] = None):
        """x (B, H, W, C), prompts (1 or B, P, C) or None -> merged x (B, ceil(H/2), ceil(W/2),
        out_dim), and the merged prompts (Bp, P, out_dim) when prompts are given."""
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape (B, H, W, C={self.dim}), got {tuple(x.shape)}")
        batch, height, width, dim = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        h2, w2 = x.shape[1] // 2, x.shape[2] // 2
        x = x.reshape(batch, h2, 2, w2, 2, dim).permute(0, 1, 3, 4, 2, 5).flatten(3)
        if prompts is None:
            return self._reduce(x, resolve_auto(self.backend, x.device))
        _check_prompts(prompts, batch, dim)
        p = prompts.repeat(1, 1, 4)
        backend = resolve_auto(self.backend, x.device)
        if backend == "reference":  # release-style: prompts joined to the token rows
            num_prompts = p.shape[1]
            rows = torch.cat([p.expand(batch, -1, -1), x.reshape(batch, h2 * w2, 4 * dim)], dim=1)
            rows = self.reduction(self.norm(rows))
            return rows[:, num_prompts:].reshape(batch, h2, w2, -1), rows[:, :num_prompts]
        return self._reduce(x, backend), self._reduce(p, backend)

    def _reduce(self, x: Tensor, backend: str) -> Tensor:
        if backend == "reference":
            return self.reduction(self.norm(x))
        return linear(layer_norm(x, self.norm, backend, feeds_matmul=True), self.reduction.weight, self.reduction.bias)
