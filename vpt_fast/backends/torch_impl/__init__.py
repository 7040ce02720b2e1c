"""Torch backend: the prompt-aware primitives in plain PyTorch (aten ops only), the executable
specification every other backend is checked against. One module per op, as in `triton_impl/`,
`vpt_fast/ops/`, `kernels/` and `tests/`: `attention`, `layer_norm`, `add_layer_norm`, `bias_gelu`,
`rms_norm`, `swiglu`, `rope`.

Each op comes as a forward primitive and a backward primitive that computes input gradients only
(the backbone is frozen, docs/design.md §2.3). `vpt_fast/ops/<op>.py` wraps a pair in one
`torch.autograd.Function` and decides what is saved; the triton and cuda backends provide the same
primitives with the same signatures. Runs on any device.
"""
from vpt_fast.backends.torch_impl.add_layer_norm import add_layer_norm_bwd, add_layer_norm_fwd
from vpt_fast.backends.torch_impl.attention import (
    attention_bwd,
    attention_bwd_prompts,
    attention_fwd,
    gather_prompt_sets,
    reduce_prompt_sets,
)
from vpt_fast.backends.torch_impl.bias_gelu import bias_gelu_bwd, bias_gelu_fwd
from vpt_fast.backends.torch_impl.layer_norm import layer_norm_bwd, layer_norm_fwd
from vpt_fast.backends.torch_impl.rms_norm import rms_norm_bwd, rms_norm_fwd
from vpt_fast.backends.torch_impl.rope import rope_bwd, rope_fwd
from vpt_fast.backends.torch_impl.swiglu import swiglu_bwd, swiglu_fwd

__all__ = ["add_layer_norm_bwd", "add_layer_norm_fwd", "attention_bwd", "attention_bwd_prompts", "attention_fwd",
           "bias_gelu_bwd", "bias_gelu_fwd", "gather_prompt_sets", "layer_norm_bwd", "layer_norm_fwd",
           "reduce_prompt_sets", "rms_norm_bwd", "rms_norm_fwd", "rope_bwd", "rope_fwd", "swiglu_bwd", "swiglu_fwd"]
