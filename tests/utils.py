"""Test helpers: comparisons that say where the largest difference is, and FlashAttention's
tolerance rule (DESIGN.md §5)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vpt_fast.backends import torch_impl


def max_error(actual: Tensor, expected: Tensor) -> float:
    """Largest absolute difference, computed in float64."""
    if actual.numel() == 0:
        return 0.0
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def _where(actual: Tensor, expected: Tensor) -> str:
    diff = (actual.detach().double() - expected.detach().double()).abs()
    flat = torch.nan_to_num(diff, nan=float("inf")).reshape(-1).argmax().item()
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return (f"max abs error {diff.reshape(-1)[flat].item():.3e} at index {idx} of shape "
            f"{tuple(diff.shape)}: actual {actual.detach().reshape(-1)[flat].item():.6g}, "
            f"expected {expected.detach().reshape(-1)[flat].item():.6g}")


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-5, rtol: float = 1e-5,
                 name: str = "tensor") -> None:
    """|actual - expected| <= atol + rtol * |expected| everywhere; on failure report the worst spot."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())  # NaN counts as bad
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements out of tolerance "
                             f"(atol={atol:g}, rtol={rtol:g}); {_where(actual, expected)}")


def assert_flash_rule(actual: Tensor, reference: Tensor, baseline: Tensor, name: str = "tensor",
                      factor: float = 2.0, atol: float = 1e-5) -> None:
    """FlashAttention's rule: err(actual) <= factor * err(baseline) + atol, both against the high
    precision `reference`; `baseline` is the eager PyTorch result in the same low precision."""
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    err, base = max_error(actual, reference), max_error(baseline, reference)
    if not err <= factor * base + atol:  # NaN fails
        raise AssertionError(f"{name}: error {err:.3e} > {factor:g} x baseline error {base:.3e} + "
                             f"{atol:g}; {_where(actual, reference)}")


def rel_error(actual: Tensor, expected: Tensor, eps: Optional[float] = 1e-12) -> float:
    """max |actual - expected| / max |expected|."""
    return max_error(actual, expected) / max(expected.detach().double().abs().max().item(), eps)


def training_results(model, backend: str, x: Tensor, y: Tensor, seed: int = 1):
    """Logits and the gradients of every trainable parameter after one cross-entropy backward,
    with the model switched to `backend` and the RNG seeded (same prompt-dropout masks for all)."""
    import torch.nn.functional as F

    import vpt_fast
    vpt_fast.set_backend(model, backend)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def assert_matches_reference(model, backends, x: Tensor, y: Tensor, tol: float = 1e-4) -> None:
    """Every backend's logits and trainable gradients within `tol` (relative) of the reference."""
    ref_logits, ref_grads = training_results(model, "reference", x, y)
    assert ref_grads and all(g.abs().sum() > 0 for g in ref_grads.values())
    for backend in backends:
        logits, grads = training_results(model, backend, x, y)
        assert rel_error(logits, ref_logits) < tol, f"{backend}: logits"
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            assert rel_error(grad, ref_grads[name]) < tol, f"{backend}: grad of {name}"


def eager_attention_low_precision(q, k, v, pk, pv, bias, dout, scale):
    """timm-style eager attention on the concatenated keys in the inputs' dtype, with autograd."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    pk_, pv_ = (None, None) if pk is None else (t.detach().clone().requires_grad_() for t in (pk, pv))
    kk, vv = torch_impl._joint_kv(k, v, pk_, pv_)
    s = (q * scale) @ kk.transpose(-1, -2)
    mask = torch_impl._joint_bias(bias, q.shape[0], 0 if pk is None else pk.shape[2])
    if mask is not None:
        s = s + mask.to(s.dtype)
    out = s.softmax(-1) @ vv
    leaves = [q, k, v] + ([] if pk is None else [pk_, pv_])
    grads = torch.autograd.grad(out, leaves, dout)
    return out, list(grads) + ([None, None] if pk is None else [])


def assert_follows_reference_in_low_precision(model, backend: str, x: Tensor, y: Tensor, device_type: str,
                                              fp32_tol: Optional[float] = 1e-4,
                                              dtype: torch.dtype = torch.bfloat16) -> None:
    """Logits and every trainable gradient of `backend`: in fp32 within `fp32_tol` (relative) of the
    reference backend; under `dtype` autocast, FlashAttention's rule against that fp32 reference —
    at most 2x the error of eager release-style VPT under the same autocast, plus one `dtype` ulp at
    the tensor's scale (small tensors such as the head's are otherwise rounding-noise bound)."""
    def result(name: str, precision: torch.dtype):
        with torch.autocast(device_type, dtype=precision, enabled=precision != torch.float32):
            logits, grads = training_results(model, name, x, y)
        return [logits.float()] + [g.float() for g in grads.values()]

    reference = result("reference", torch.float32)
    if fp32_tol is not None:
        for i, (got, ref) in enumerate(zip(result(backend, torch.float32), reference)):
            assert rel_error(got, ref) < fp32_tol, f"{backend} fp32 output {i}"
    baseline = result("reference", dtype)
    ulp = torch.finfo(dtype).eps
    for i, (got, ref, base) in enumerate(zip(result(backend, dtype), reference, baseline)):
        assert_flash_rule(got, ref, base, name=f"{backend} {dtype} output {i}", atol=ulp * ref.abs().max().item())
