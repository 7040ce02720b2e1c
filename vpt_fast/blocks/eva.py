"""EvaBlock: a drop-in, prompt-aware replacement for timm's `EvaBlock` (DINOv3, EVA-02, PE, RoPE ViTs).

The same prompt-aware algorithm as `ViTBlock` (docs/design.md §1, §9), with what timm's Eva block
adds: rotary position embeddings on the rows after the prefix (`rope=`; separate prompt rows are
never rotated, so the prompts sit between the prefix and the rotated patches, exactly as timm's
rotation with its prefix/patch split moved by P), `q_bias`/`v_bias` beside a bias-free fused qkv or
separate q/k/v projections, grouped-query K/V (`AttentionRope(num_kv_heads=...)`), LayerScale as the
`gamma_1`/`gamma_2` vectors, RmsNorm, and SwiGLU / GluMlp MLPs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from vpt_fast.blocks.common import check_mlp, check_norm
from vpt_fast.blocks.vit import ViTBlock


class EvaBlock(ViTBlock):
    """Prompt-aware timm Eva block.

    Args:
        block: a timm `eva.EvaBlock` (attention `EvaAttention` or `AttentionRope`) whose submodules
            and LayerScale vectors are taken over (not copied).
        num_prefix_tokens: class + register tokens at the start of the sequence (never rotated).
        backend: one of `vpt_fast.backends.BACKENDS`.
        recompute: "none", "mlp" or "block" (see `PromptConfig`).
    """

    def _take_over(self, block: nn.Module) -> None:
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention
        from timm.models.eva import EvaBlock as TimmEvaBlock
        if type(block) is not TimmEvaBlock:  # EvaBlockPostNorm normalises after the residual: other arithmetic
            raise TypeError(f"EvaBlock.from_timm expects timm.models.eva.EvaBlock, got "
                            f"{type(block).__module__}.{type(block).__name__}")
        attn = block.attn
        if type(attn) not in (EvaAttention, AttentionRope):
            raise TypeError(f"EvaBlock supports timm EvaAttention and AttentionRope, got {type(attn).__module__}."
                            f"{type(attn).__name__}")
        if getattr(attn, "gate", None) is not None:
            raise TypeError("gated attention (timm Eva gated_attn=True) is not supported")
        if getattr(attn, "qkv_bias_separate", False):
            raise TypeError("qkv_bias_separate=True is not supported (the bias is added after the GEMM)")
        for name in ("norm1", "norm2"):
            check_norm(getattr(block, name), f"block.{name}")
        for name in ("q_norm", "k_norm", "norm"):
            check_norm(getattr(attn, name), f"block.attn.{name}", identity=True)
        check_mlp(block.mlp)
        self.norm1, self.attn, self.drop_path1 = block.norm1, block.attn, block.drop_path1
        self.norm2, self.mlp, self.drop_path2 = block.norm2, block.mlp, block.drop_path2
        self.gamma_1, self.gamma_2 = block.gamma_1, block.gamma_2

    def _fused_qkv(self) -> Optional[tuple[Tensor, Optional[Tensor]]]:
        attn = self.attn
        if attn.qkv is None:
            return None
        if getattr(attn, "q_bias", None) is not None:  # EvaAttention: k's bias is a zero buffer
            return attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        return attn.qkv.weight, attn.qkv.bias

    def _kv_heads(self) -> int:
        return getattr(self.attn, "num_kv_heads", self.attn.num_heads)

    def _layer_scales(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return self.gamma_1, self.gamma_2

    def _timm_forward(self, x: Tensor, rope: Optional[Tensor] = None) -> Tensor:
        x_attn = self.attn(self.norm1(x), rope=rope)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = x + self.drop_path1(x_attn)
        x_mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            x_mlp = self.gamma_2 * x_mlp
        return x + self.drop_path2(x_mlp)
