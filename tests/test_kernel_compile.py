"""Every Triton kernel compiles for an H100 (sm_90) with the installed triton, in the specialisations
the primitives launch on a GPU (block sizes, warps, dtypes, feature flags), without a GPU: launches
are recorded under the interpreter (tests/kernel_compile.py) and compiled in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_compile import capture

DTYPES = (torch.float32, torch.bfloat16)  # the row ops; fp16 takes bf16's code paths


def _attention_cases(dtype: torch.dtype, d: int):
    """Forward and backward with each prompt layout (none, shared, per-set index), a Swin-style bias,
    and the qkv gradient buffer: ViT-B/16-like rows (197 tokens + 50 prompts), batch 2, 2 heads."""
    from vpt_fast.backends import triton_impl as t
    B, H, N, P = 2, 2, 197, 50
    qkv = torch.randn(B, N, 3, H, d, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    pk, pv = torch.randn(1, H, P, d, dtype=dtype), torch.randn(1, H, P, d, dtype=dtype)
    sets_k, sets_v = torch.randn(3, H, P, d, dtype=dtype), torch.randn(3, H, P, d, dtype=dtype)
    index = torch.tensor([2, 0])
    out, dout = torch.randn(B, H, N, d, dtype=dtype), torch.randn(B, H, N, d, dtype=dtype)
    lse = torch.randn(B, H, N)
    win = torch.randn(B, H, 49, d, dtype=dtype)
    bias = torch.randn(1, H, 49, 49, dtype=dtype)
    wlse = torch.randn(B, H, 49)
    return [
        lambda: t.attention_fwd(q, k, v, None, None, 0.125),
        lambda: t.attention_fwd(q, k, v, pk, pv, 0.125),
        lambda: t.attention_fwd(q, k, v, sets_k, sets_v, 0.125, prompt_index=index),
        lambda: t.attention_fwd(win, win, win, pk, pv, 0.125, bias=bias),
        lambda: t.attention_bwd(dout, q, k, v, None, None, out, lse, 0.125),
        lambda: t.attention_bwd(dout, q, k, v, pk, pv, out, lse, 0.125, dqkv=torch.empty_like(qkv)),
        lambda: t.attention_bwd(dout, q, k, v, sets_k, sets_v, out, lse, 0.125, prompt_index=index),
        lambda: t.attention_bwd(win, win, win, win, pk, pv, win, wlse, 0.125, bias=bias),
    ]


def _row_op_cases(dtype: torch.dtype):
    """LayerNorm (rows in `dtype`, output in `dtype` and, from float32 rows, in bf16 as under
    autocast), the residual add + LayerNorm with and without a LayerScale, bias + GELU, RMSNorm (as
    LayerNorm), the SwiGLU gate (on a packed buffer's halves; backward out of place and in place), the
    rotary embedding in place on a strided 4D view (both layouts)."""
    from vpt_fast.backends import triton_impl as t
    rows, width = 394, 768
    x, dy = torch.randn(rows, width, dtype=dtype), torch.randn(rows, width, dtype=dtype)
    w, b = torch.randn(width), torch.randn(width)
    mean, rstd = torch.randn(rows), torch.rand(rows)
    scale = torch.rand(width)
    h, dg, hb = torch.randn(rows, 4 * width, dtype=dtype), torch.randn(rows, 4 * width, dtype=dtype), torch.randn(
        4 * width, dtype=dtype)
    out_dtype = torch.bfloat16 if dtype == torch.float32 else None
    return [
        lambda: t.layer_norm_fwd(x, w, b, 1e-6, out_dtype),
        lambda: t.layer_norm_bwd(dy, x, w, mean, rstd),
        lambda: t.add_layer_norm_fwd(x, x, None, w, b, 1e-6, out_dtype),
        lambda: t.add_layer_norm_fwd(x, x, scale, w, b, 1e-6, out_dtype),
        lambda: t.add_layer_norm_bwd(dy, dy, x, w, mean, rstd, None, dtype),
        lambda: t.add_layer_norm_bwd(dy, dy, x, w, mean, rstd, scale, dtype),
        lambda: t.bias_gelu_fwd(h, hb),
        lambda: t.bias_gelu_bwd(dg, h, None),
        lambda: t.rms_norm_fwd(x, w, 1e-6, out_dtype),
        lambda: t.rms_norm_bwd(dy, x, w, rstd),
        lambda: t.swiglu_fwd(*h.chunk(2, dim=-1)),
        lambda: t.swiglu_bwd(dy, x, dy),
        lambda: t.swiglu_bwd(dy, x, dy.clone(), inplace=True),
        lambda: t.rope_fwd(h[:, :256].reshape(rows, 4, 1, 64).transpose(1, 2), scale[:128].expand(4, 128), False),
        lambda: t.rope_bwd(h[:, :256].reshape(rows, 4, 1, 64).transpose(1, 2), scale[:128].expand(4, 128), True),
    ]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves (GPU tests)")
def test_every_kernel_compiles_for_sm90(impl, tmp_path: Path):
    # attention: bf16 at both tile widths (d <= 64 and d > 64 take different block sizes), fp32 at one
    cases = [c for dtype, d in ((torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float32, 64))
             for c in _attention_cases(dtype, d)]
    cases += [c for dtype in DTYPES for c in _row_op_cases(dtype)]
    specs = capture(cases)
    kernels = {spec["kernel"].split(":")[1] for spec in specs}
    launched = {"_attention_fwd", "_attention_bwd", "_attention_bwd_dq", "_attention_bwd_reduce",
                "_layer_norm_fwd", "_layer_norm_bwd", "_add_layer_norm_fwd", "_add_layer_norm_bwd",
                "_bias_gelu_fwd", "_bias_gelu_bwd", "_rms_norm_fwd", "_rms_norm_bwd", "_swiglu_fwd", "_swiglu_bwd",
                "_rope_fwd", "_rope_bwd"}
    assert kernels == launched
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("kernel_compile.py")), str(path),
                           "--arch", "90"], capture_output=True, text=True, env=env, timeout=1200)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failures = [r for r in results if not r["ok"]]
    assert len(results) == len(specs) and not failures, (failures[:3], done.stderr[-3000:])
