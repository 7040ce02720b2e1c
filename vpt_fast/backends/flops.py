"""FLOP formulas of the prompt-aware attention ops, registered for every backend's custom ops so
`torch.utils.flop_counter.FlopCounterMode` counts them (docs/design.md §6)."""
from __future__ import annotations

import torch


def attention_flops(q_shape, k_shape, pk_shape) -> int:
    """4 * B * H * Nq * (P + Nk) * d: QK^T and PV over both key segments."""
    B, H, Nq, d = q_shape
    P = 0 if pk_shape is None else pk_shape[2]
    return 4 * B * H * Nq * (P + k_shape[2]) * d


def register_attention_flops(fwd_name: str, bwd_name: str) -> None:
    """Count `vpt_fast::<fwd_name>(q, k, v, pk, pv, ...)` and `vpt_fast::<bwd_name>(dout, q, k, v, pk,
    ...)`; the backward is 2.5x the forward (FlashAttention's convention)."""
    try:
        from torch.utils.flop_counter import register_flop_formula
        fwd_op, bwd_op = getattr(torch.ops.vpt_fast, fwd_name), getattr(torch.ops.vpt_fast, bwd_name)
    except (ImportError, AttributeError):  # pragma: no cover - old torch, or the ops not registered
        return

    @register_flop_formula(fwd_op)
    def _fwd(q_shape, k_shape, v_shape, pk_shape, *args, **kwargs) -> int:
        return attention_flops(q_shape, k_shape, pk_shape)

    @register_flop_formula(bwd_op)
    def _bwd(dout_shape, q_shape, k_shape, v_shape, pk_shape, *args, **kwargs) -> int:
        return attention_flops(q_shape, k_shape, pk_shape) * 5 // 2
