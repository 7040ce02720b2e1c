"""The frozen pre-norm MLP (`vpt_fast.ops.mlp.norm_mlp`): equal to timm's, and its backward holds at
most two buffers of the hidden width at once (h, and dg overwritten by dh)."""
import weakref

import pytest
import torch
from timm.layers import Mlp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vpt_fast.ops.mlp import add_norm_mlp, add_norm_mlp_residual, norm_mlp


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode and still alive."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self._seen = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in self._seen
                    and t.untyped_storage().data_ptr() not in inputs):  # views and in-place results are not new
                storage = t.untyped_storage()
                self.live += storage.nbytes()
                self._seen[id(storage)] = weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, key, nbytes):
        self.live -= nbytes
        self._seen.pop(key, None)


def _mlp(width=64, hidden=256):
    torch.manual_seed(0)
    norm, mlp = torch.nn.LayerNorm(width), Mlp(width, hidden)
    for p in list(norm.parameters()) + list(mlp.parameters()):
        p.requires_grad_(False)
    return norm, mlp


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("recompute_fc1", [False, True])
def test_norm_mlp_matches_timm(impl, backend, recompute_fc1):
    norm, mlp = _mlp()
    x = torch.randn(2, 9, 64, requires_grad=True)
    dout = torch.randn(2, 9, 64)
    expected = mlp(norm(x))
    (dx_expected,) = torch.autograd.grad(expected, x, dout)
    out = norm_mlp(x, norm, mlp, recompute_fc1, backend)
    (dx,) = torch.autograd.grad(out, x, dout)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_add", [False, True])
@pytest.mark.parametrize("recompute_fc1", [False, True])
def test_norm_mlp_backward_peak(recompute_fc1, fused_add):
    """The hidden-width buffers alive together in the MLP's backward are at most h and one gradient
    buffer (dg, overwritten by dh), never h, dg and dh."""
    batch, rows, width, hidden = 4, 32, 64, 1024
    norm, mlp = _mlp(width, hidden)
    x = torch.randn(batch, rows, width, requires_grad=True)
    dout = torch.randn(batch, rows, width)
    if fused_add:
        branch = torch.randn(batch, rows, width, requires_grad=True)
        _, out = add_norm_mlp(x, branch, None, norm, mlp, recompute_fc1, "torch")
    else:
        out = norm_mlp(x, norm, mlp, recompute_fc1, "torch")
    hidden_bytes = batch * rows * hidden * 4
    with _LiveBytes() as meter:
        out.backward(dout)
    new_hidden = 2 if recompute_fc1 else 1  # h itself is recomputed, or saved before the meter started
    assert meter.peak <= new_hidden * hidden_bytes + 4 * x.nbytes, (meter.peak, hidden_bytes)


def _add_norm_mlp_reference(residual, branch, scale, norm, mlp, backend):
    """The training path: `add_norm_mlp` then timm's second residual add."""
    s, y = add_norm_mlp(residual, branch, scale, norm, mlp, False, backend)
    return s + y


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("fc2_bias", [False, True])
def test_add_norm_mlp_residual_equals_training_path(impl, backend, with_scale, fc2_bias):
    """Inference: both residual adds in place (s into the branch's buffer, then fc2 accumulating into
    s) give the training path's values within 1e-6 relative, and the output is the branch's buffer."""
    norm, mlp = _mlp()
    if not fc2_bias:
        mlp.fc2.bias = None
    residual, branch = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    scale = torch.rand(64) if with_scale else None
    with torch.no_grad():
        expected = _add_norm_mlp_reference(residual, branch.clone(), scale, norm, mlp, backend)
        out = add_norm_mlp_residual(residual, branch, scale, norm, mlp, backend)
    assert out.data_ptr() == branch.data_ptr()
    assert (out - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_add_norm_mlp_residual_under_autocast_and_refuses_gradients():
    """Under bf16 autocast fc2 runs in bf16 and is added to the float32 stream like timm's `x + y`;
    with gradients enabled the in-place path refuses (its writes would corrupt saved tensors)."""
    norm, mlp = _mlp()
    residual, branch = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _add_norm_mlp_reference(residual, branch.clone(), None, norm, mlp, "torch")
        out = add_norm_mlp_residual(residual, branch, None, norm, mlp, "torch")
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="inference"):
        add_norm_mlp_residual(residual, branch, None, norm, mlp, "torch")


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_inference_counts_the_same_flops_as_a_forward_with_gradients(family):
    """The inference block path accumulates fc2 into the residual (`addmm` with out=): FlopCounterMode
    must still count every GEMM, so no-grad and grad-enabled forwards count the same FLOPs once the
    prompt cache is off (a prompt change per call)."""
    from torch.utils.flop_counter import FlopCounterMode

    from utils import prompted_swin, prompted_vit, random_batch
    model = (prompted_vit(num_prompts=4, deep=True) if family == "vit" else
             prompted_swin(num_prompts=4, deep=True)).eval()
    x, _ = random_batch(model, 2)
    counts = []
    for grad in (True, False):
        model.vpt.kv_cache.clear()
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            model(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
