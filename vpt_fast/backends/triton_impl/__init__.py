"""Triton backend: fourteen primitives of `torch_impl` (same signatures, same semantics), run by the
kernels in `vpt_fast.kernels` (docs/design.md §2.4). One module per op, as in `vpt_fast/kernels/`,
`vpt_fast/ops/` and `tests/`: `attention`, `layer_norm`, `add_layer_norm`, `bias_gelu`, `rms_norm`,
`swiglu`, `rope`; `common` holds availability, argument checks and launch helpers.

Each primitive is a thin Python function that validates its arguments and calls a torch custom op
`vpt_fast::triton_<name>` (a `torch.library.triton_op` on GPU; a `custom_op` with a fake
implementation under the interpreter), so `torch.compile` traces the kernels without graph breaks
and `torch.utils.flop_counter` counts attention FLOPs.

Supported: CUDA tensors (or any device under `TRITON_INTERPRET=1`, the CPU interpreter used by the
tests), dtypes float32 / float16 / bfloat16.
"""
from vpt_fast.backends.triton_impl.add_layer_norm import add_layer_norm_bwd, add_layer_norm_fwd
from vpt_fast.backends.triton_impl.attention import attention_bwd, attention_fwd
from vpt_fast.backends.triton_impl.bias_gelu import bias_gelu_bwd, bias_gelu_fwd
from vpt_fast.backends.triton_impl.common import AVAILABLE, INTERPRET, UNAVAILABLE_REASON
from vpt_fast.backends.triton_impl.layer_norm import layer_norm_bwd, layer_norm_fwd
from vpt_fast.backends.triton_impl.rms_norm import rms_norm_bwd, rms_norm_fwd
from vpt_fast.backends.triton_impl.rope import rope_bwd, rope_fwd
from vpt_fast.backends.triton_impl.swiglu import swiglu_bwd, swiglu_fwd

__all__ = ["AVAILABLE", "INTERPRET", "UNAVAILABLE_REASON", "add_layer_norm_bwd", "add_layer_norm_fwd",
           "attention_bwd", "attention_fwd", "bias_gelu_bwd", "bias_gelu_fwd", "layer_norm_bwd", "layer_norm_fwd",
           "rms_norm_bwd", "rms_norm_fwd", "rope_bwd", "rope_fwd", "swiglu_bwd", "swiglu_fwd"]
