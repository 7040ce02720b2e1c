"""The frozen pre-norm MLP (`vpt_fast.ops.mlp.norm_mlp`): equal to timm's, and its backward holds at
most two buffers of the hidden width at once (h, and dg overwritten by dh)."""
import weakref

import pytest
import torch
from timm.layers import Mlp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vpt_fast.ops.mlp import add_norm_mlp, norm_mlp


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
