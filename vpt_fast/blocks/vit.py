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

from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vpt_fast.backends import resolve_auto, validate_backend
from vpt_fast.blocks.common import (
    PromptKV,
    PromptQKV,
    apply_norm,
    check_mlp,
    check_norm,
    pad_rope_rows,
    prompt_tensors,
    residual_mlp,
    rotate_patch_rows,
    strip_rope_rows,
    warn_if_hooks_bypassed,
)
from vpt_fast.config import RECOMPUTE
from vpt_fast.ops.attention import attention, attention_qkv, gather_prompt_sets
from vpt_fast.ops.linear import linear


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
        self._take_over(block)
        self.num_prefix_tokens = num_prefix_tokens
        self.backend = validate_backend(backend)
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
        self.recompute = recompute

    def _take_over(self, block: nn.Module) -> None:
        """Check `block` and take over its submodules under timm's names (state_dict keys unchanged)."""
        from timm.layers import Attention
        from timm.models.vision_transformer import Block
        if type(block) is not Block:
            raise TypeError(f"ViTBlock.from_timm expects timm.models.vision_transformer.Block, "
                            f"got {type(block).__module__}.{type(block).__name__}")
        attn = block.attn
        if type(attn) is not Attention:  # e.g. DiffAttention (attn_layer='diff'): other arithmetic
            raise TypeError(f"ViTBlock supports timm.layers.Attention, got {type(attn).__module__}."
                            f"{type(attn).__name__}")
        if getattr(attn, "gate", None) is not None:
            raise TypeError("gated attention (timm Attention(gated=True)) is not supported")
        if not isinstance(attn.qkv, nn.Linear):
            raise TypeError(f"expected attn.qkv to be nn.Linear, got {type(attn.qkv).__name__}")
        for name in ("norm1", "norm2"):
            check_norm(getattr(block, name), f"block.{name}")
        for name in ("q_norm", "k_norm", "norm"):
            check_norm(getattr(attn, name), f"block.attn.{name}", identity=True)
        check_mlp(block.mlp)
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2

    @classmethod
    def from_timm(cls, block: nn.Module, **kwargs) -> "ViTBlock":
        return cls(block, **kwargs)

    # --- what differs between the timm blocks: projections, layer scales, timm's own forward ---
    def _fused_qkv(self) -> Optional[tuple[Tensor, Optional[Tensor]]]:
        """(weight (3A, D), bias) of the fused q/k/v projection, or None when q, k, v are separate."""
        return self.attn.qkv.weight, self.attn.qkv.bias

    def _kv_heads(self) -> int:
        return self.attn.num_heads

    def _layer_scales(self) -> tuple[Optional[Union[nn.Module, Tensor]], Optional[Union[nn.Module, Tensor]]]:
        return self.ls1, self.ls2

    def _timm_forward(self, x: Tensor, rope: Optional[Tensor] = None) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward(self, x: Tensor, prompts: Union[Tensor, PromptKV, None] = None, query_rows: Optional[int] = None,
                prompt_index: Optional[Tensor] = None, rope: Optional[Tensor] = None) -> Tensor:
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
            rope: the rotary embedding of x's rows after the prefix (timm's `rot_pos_embed`, rows on
                dim -2; Eva blocks only). Separate prompts are never rotated.
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
            run, args = self._reference_rows, (x, prompts, query_rows, rope)
        else:
            run, args = self._forward, (x, prompts, backend, query_rows, prompt_index, rope)
        # "block" (and timm's set_grad_checkpointing) applies to every backend, the reference included
        if self.recompute == "block" and torch.is_grad_enabled() and (x.requires_grad or any(
                t.requires_grad for t in prompt_tensors(prompts))):
            return checkpoint(run, *args, use_reentrant=False)
        return run(*args)

    def _reference_rows(self, x: Tensor, prompts: Optional[Tensor], query_rows: Optional[int],
                        rope: Optional[Tensor] = None) -> Tensor:
        out = self.forward_reference(x, prompts, rope)
        return out if query_rows is None else out[:, :query_rows]

    def forward_reference(self, x: Tensor, prompts: Optional[Tensor] = None, rope: Optional[Tensor] = None) -> Tensor:
        """Release-style VPT: timm's block on [prefix, prompts, patches], prompt rows dropped. The
        prompt rows get the identity rotation (their rows of the rotary embedding are sin 0, cos 1),
        which is timm's own rotation with the prefix/patch split moved by P."""
        if prompts is None:
            return self._timm_forward(x, rope)
        npfx, num_prompts = self.num_prefix_tokens, prompts.shape[1]
        full = torch.cat([x[:, :npfx], prompts.expand(x.shape[0], -1, -1), x[:, npfx:]], dim=1)
        out = self._timm_forward(full, None if rope is None else pad_rope_rows(rope, num_prompts))
        return torch.cat([out[:, :npfx], out[:, npfx + num_prompts:]], dim=1)

    def _forward(self, x: Tensor, prompts, backend: str, query_rows: Optional[int] = None,
                 prompt_index: Optional[Tensor] = None, rope: Optional[Tensor] = None) -> Tensor:
        residual = x if query_rows is None else x[:, :query_rows]
        branch = self._attention(x, prompts, backend, query_rows, prompt_index, rope)
        return residual_mlp(self, residual, branch, backend, *self._layer_scales())

    def _project(self, xn: Tensor, parts: str) -> list[Tensor]:
        """The projections `parts` ("qkv", "q" or "kv") of normalised rows (B, N, D), each (B, heads, N, d)
        (k and v with the key/value heads). A fused projection runs as one GEMM over its rows."""
        attn = self.attn
        batch, rows, _ = xn.shape
        heads = {"q": attn.num_heads, "k": self._kv_heads(), "v": self._kv_heads()}
        width = {p: heads[p] * attn.head_dim for p in "qkv"}
        fused = self._fused_qkv()
        if fused is None:
            layers = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}
            outs = [linear(xn, layers[p].weight, layers[p].bias) for p in parts]
        else:
            weight, bias = fused
            start = {"q": 0, "k": width["q"], "v": width["q"] + width["k"]}[parts[0]]
            stop = start + sum(width[p] for p in parts)
            out = linear(xn, weight[start:stop], None if bias is None else bias[start:stop])
            offsets = [sum(width[p] for p in parts[:i]) for i in range(len(parts))]
            # narrow, not split: the rotary op writes q and k in place, which autograd forbids on split outputs
            outs = [out.narrow(-1, offset, width[p]) for offset, p in zip(offsets, parts)]
        return [o.view(batch, rows, heads[p], attn.head_dim).transpose(1, 2) for o, p in zip(outs, parts)]

    def _kv_for_attention(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Grouped-query K/V heads repeated to the query heads, as timm does after norm and rope."""
        groups = self.attn.num_heads // self._kv_heads()
        if groups == 1:
            return k, v
        return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def prompt_kv(self, prompts: Tensor, backend: str) -> PromptKV:
        """Prompt rows (S, P, D) -> their keys and values (S, H, P, d): norm1, the K/V rows of the
        projection, k-norm (never rotated). Prompt rows need nothing else: their queries and outputs
        are discarded."""
        attn, backend = self.attn, resolve_auto(backend, prompts.device)
        pk, pv = self._project(apply_norm(prompts, self.norm1, backend, feeds_matmul=True), "kv")
        return PromptKV(*self._kv_for_attention(apply_norm(pk, attn.k_norm, backend, feeds_matmul=True), pv))

    def _own_qkv(self, x: Tensor, backend: str, query_rows: Optional[int], rope: Optional[Tensor],
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries of the first `query_rows` rows (all rows: None), keys and values of every row of x,
        each (B, H, rows, d): norm1, projection, qk-norm, rotation of the rows after the prefix."""
        attn = self.attn
        xn = apply_norm(x, self.norm1, backend, feeds_matmul=True)
        if query_rows is None:
            q, k, v = self._project(xn, "qkv")
        else:  # every row gives keys and values, only the first `query_rows` rows ask queries
            (q,) = self._project(xn[:, :query_rows], "q")
            k, v = self._project(xn, "kv")
        q = apply_norm(q, attn.q_norm, backend, feeds_matmul=True)
        k = apply_norm(k, attn.k_norm, backend, feeds_matmul=True)
        if rope is not None:
            half = getattr(attn, "rotate_half", False)
            q = rotate_patch_rows(q, rope, self.num_prefix_tokens, half, backend)
            k = rotate_patch_rows(k, rope, self.num_prefix_tokens, half, backend)
        return (q, *self._kv_for_attention(k, v))

    def _attention(self, x: Tensor, prompts, backend: str, query_rows: Optional[int] = None,
                   prompt_index: Optional[Tensor] = None, rope: Optional[Tensor] = None) -> Tensor:
        attn = self.attn
        batch, num_tokens, _ = x.shape
        pk, pv = (None, None) if prompts is None else (
            prompts if isinstance(prompts, PromptKV) else self.prompt_kv(prompts, backend))
        # the index comes checked from the model (PromptBank checks task ids once): no per-block sync
        options = dict(scale=attn.scale, backend=backend, prompt_index=prompt_index, check_index_range=False)
        fused = self._fused_qkv()
        plain_qk = isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
        one_qkv = fused is not None and self._kv_heads() == attn.num_heads
        if query_rows is None and plain_qk and rope is None and one_qkv:
            # q, k, v as one tensor: its gradient is one buffer, no stacking
            xn = apply_norm(x, self.norm1, backend, feeds_matmul=True)
            qkv = linear(xn, *fused).view(batch, num_tokens, 3, attn.num_heads, attn.head_dim)
            o = attention_qkv(qkv, pk, pv, **options)
        else:
            o = attention(*self._own_qkv(x, backend, query_rows, rope), pk, pv, **options)
        return self._project_out(o, backend)

    def _project_out(self, o: Tensor, backend: str) -> Tensor:
        """Attention output (B, H, rows, d) -> the branch (B, rows, D): inner norm, output projection."""
        attn = self.attn
        o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], attn.num_heads * attn.head_dim)
        o = apply_norm(o, attn.norm, backend, feeds_matmul=True)
        return linear(o, attn.proj.weight, attn.proj.bias)

    def prompt_qkv(self, prompts: Tensor, backend: str) -> PromptQKV:
        """Prompt rows (S, P, D) -> their queries, keys and values (S, H, P, d): norm1, the qkv
        projection, qk-norm (never rotated). Shallow VPT's block 0 needs all three: there the prompt
        rows are ordinary tokens whose outputs continue through the later blocks."""
        attn, backend = self.attn, resolve_auto(backend, prompts.device)
        q, k, v = self._project(apply_norm(prompts, self.norm1, backend, feeds_matmul=True), "qkv")
        k, v = self._kv_for_attention(apply_norm(k, attn.k_norm, backend, feeds_matmul=True), v)
        return PromptQKV(apply_norm(q, attn.q_norm, backend, feeds_matmul=True), k, v)

    def forward_prompt_rows(self, x: Tensor, prompt_qkv: PromptQKV, prompt_start: int,
                            query_rows: Optional[int] = None, prompt_index: Optional[Tensor] = None,
                            rope: Optional[Tensor] = None) -> Tensor:
        """Timm's block on x (B, N, D) whose rows [prompt_start, prompt_start + P) are prompt rows
        with their queries, keys and values already computed by `prompt_qkv` (a cache: shallow VPT's
        block 0 without gradients). norm1 and the qkv projection run on the other rows only; the
        prompt rows' outputs are returned like any row's (B, N, D), or the first `query_rows` rows.

        Args:
            prompt_qkv: (Bp, H, P, d) each with Bp in {1, B}, or (S, H, P, d) sets read by `prompt_index`.
            prompt_start: index of the first prompt row (the number of prefix tokens).
            query_rows, prompt_index: as in `forward`.
            rope: the rotary embedding of x's rows after the prefix, prompt rows included (their rows
                are the identity rotation, as the model builds it for shallow prompts).
        """
        backend = resolve_auto(self.backend, x.device)
        if backend == "reference":
            raise ValueError("precomputed prompt queries/keys/values need a prompt-aware backend, not 'reference'")
        num_prompts = prompt_qkv.k.shape[2]
        end = prompt_start + num_prompts
        sets = x.shape[0] if prompt_index is None else prompt_qkv.k.shape[0]
        if (prompt_qkv.k.dim() != 4 or prompt_qkv.k.shape[0] not in (1, sets) or end > x.shape[1]
                or any(t.shape != prompt_qkv.k.shape for t in prompt_qkv)):
            raise ValueError(f"prompt_qkv must be three (1 or {'S' if prompt_index is not None else 'B'}={sets}, H, "
                             f"P, d) tensors with prompt_start + P <= N={x.shape[1]}, got "
                             f"{[tuple(t.shape) for t in prompt_qkv]} and prompt_start={prompt_start}")
        if query_rows is not None and not 1 <= query_rows <= x.shape[1]:
            raise ValueError(f"query_rows must be in [1, N={x.shape[1]}], got {query_rows}")
        own = torch.cat([x[:, :prompt_start], x[:, end:]], dim=1)  # every row but the prompts
        own_rope = None if rope is None else strip_rope_rows(rope, num_prompts)
        q, k, v = self._own_qkv(own, backend, None, own_rope)
        pq = prompt_qkv.q
        pq = pq.expand(own.shape[0], -1, -1, -1) if prompt_index is None else gather_prompt_sets(pq, prompt_index)
        # queries in row order; the prompt keys/values are the attention op's shared prompt segment
        q = torch.cat([q[:, :, :prompt_start], pq, q[:, :, prompt_start:]], dim=2)[:, :, :query_rows]
        # the index comes checked from the model (PromptBank checks task ids once): no per-block sync
        o = attention(q, k, v, prompt_qkv.k, prompt_qkv.v, scale=self.attn.scale, backend=backend,
                      prompt_index=prompt_index, check_index_range=False)
        return residual_mlp(self, x[:, :query_rows], self._project_out(o, backend), backend, *self._layer_scales())
