"""Low-precision models with and without autocast (issue 22, item 7): `model.to(torch.bfloat16)` then
`torch.autocast(dtype=torch.bfloat16)` is a common way to run a bf16 backbone. Every backend runs it,
ViT and Swin, deep and shallow, training (logits, prompt and head gradients, every recompute mode) and
inference (no_grad and inference_mode, which read the prompt K/V cache); so do an fp16 model under fp16
autocast, a bf16 model without autocast and an fp32 model under either autocast.

Tolerance: FlashAttention's rule (docs/design.md §5): against a float32 computation of the same
rounded weights and images, a backend's error is at most 2x the `reference` backend's in the same
precision, plus one ulp of that precision at the tensor's scale (4x for Triton's CPU interpreter,
which truncates its bf16/fp16 stores: see utils.assert_follows_reference_in_low_precision).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import vpt_fast
from utils import assert_flash_rule, prompted_swin, prompted_vit, random_batch, training_results

BACKENDS = [b for b in vpt_fast.available_backends() if b in ("torch", "cuda")]
# The Triton interpreter is slow on CPU: one configuration per family (the dtypes its kernels see come
# from the same ops-level policy as every backend's).
TRITON = ["triton"] if "triton" in vpt_fast.available_backends() else []
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CASES = {  # (model dtype, autocast dtype or None)
    "bf16_model_bf16_autocast": (BF16, BF16),
    "fp16_model_fp16_autocast": (FP16, FP16),
    "bf16_model_no_autocast": (BF16, None),
    "fp32_model_bf16_autocast": (FP32, BF16),
    "fp32_model_fp16_autocast": (FP32, FP16),
}
_MODELS: dict = {}
_REFERENCES: dict = {}


def _model(family: str, deep: bool, dtype: torch.dtype, recompute: str = "none"):
    """A tiny prompted model in `dtype` (Swin w4: small enough for the Triton interpreter), its
    float32 twin with the same rounded weights, and a batch."""
    key = (family, deep, dtype, recompute)
    if key not in _MODELS:
        if family == "vit":
            model = prompted_vit(num_prompts=4, deep=deep, recompute=recompute)
        else:
            model = prompted_swin(size="w4", deep=deep, recompute=recompute)
        model = model.to(dtype)
        x, y = random_batch(model, batch=2)
        _MODELS[key] = model, copy.deepcopy(model).float(), x.to(dtype), y
    return _MODELS[key]


def _run(model, backend: str, x, y, autocast, mode: str) -> list[torch.Tensor]:
    """Logits and every trainable gradient (`mode` "train"), or the logits of an inference pass
    ("no_grad", "inference_mode"), as float32."""
    with torch.autocast("cpu", dtype=autocast or BF16, enabled=autocast is not None):
        if mode == "train":
            logits, grads = training_results(model.train(), backend, x, y)
            assert grads and all(g.dtype == x.dtype for g in grads.values()), "gradients in the model's dtype"
            return [logits.float()] + [g.float() for g in grads.values()]
        vpt_fast.set_backend(model.eval(), backend)
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            return [model(x).float() for _ in range(2)][1:]  # the second pass reads the K/V cache


def _references(family: str, deep: bool, case: str, mode: str, recompute: str):
    """(float32 result, `reference` backend's result in the case's precision), computed once."""
    key = (family, deep, case, mode, recompute)
    if key not in _REFERENCES:
        model, model32, x, y = _model(family, deep, CASES[case][0], recompute)
        _REFERENCES[key] = (_run(model32, "reference", x.float(), y, None, mode),
                            _run(model, "reference", x, y, CASES[case][1], mode))
    return _REFERENCES[key]


def _check(family: str, deep: bool, case: str, backend: str, mode: str, recompute: str = "none"):
    dtype, autocast = CASES[case]
    model, _, x, y = _model(family, deep, dtype, recompute)
    expected, baseline = _references(family, deep, case, mode, recompute)
    got = _run(model, backend, x, y, autocast, mode)
    ulp = torch.finfo(autocast or dtype).eps
    factor = 4.0 if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" else 2.0
    for i, (g, e, b) in enumerate(zip(got, expected, baseline)):
        assert_flash_rule(g, e, b, name=f"{backend} {case} {mode} output {i}", factor=factor,
                          atol=ulp * e.abs().max().item())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_follows_reference(backend, family, deep, case):
    _check(family, deep, case, backend, "train")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_follows_reference(backend, family, deep, case, mode):
    _check(family, deep, case, backend, mode)


@pytest.mark.filterwarnings("ignore:recompute=.mlp. has no effect with backend=.reference.")
@pytest.mark.parametrize("recompute", ["mlp", "block"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_recompute_follows_reference(backend, family, deep, recompute):
    _check(family, deep, "bf16_model_bf16_autocast", backend, "train", recompute)


@pytest.mark.parametrize("mode", ["train", "inference_mode"])
@pytest.mark.parametrize("family", ["vit", pytest.param("swin", marks=pytest.mark.slow)])  # ~1 min each here
@pytest.mark.parametrize("backend", TRITON)
def test_triton_bf16_model_under_autocast(backend, family, mode):
    _check(family, True, "bf16_model_bf16_autocast", backend, mode)
