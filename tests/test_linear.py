"""The frozen linear layer (`vpt_fast.ops.linear.linear`): dX equals autograd's through `F.linear`, a
frozen weight gets no gradient and nothing but the weight is saved; a trainable weight or bias takes
autograd's own path."""
import pytest
import torch
import torch.nn.functional as F

from vpt_fast.ops.linear import linear


def _inputs(shape=(3, 5, 16), out_features=24, dtype=torch.float64, with_bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(out_features, shape[-1], generator=g, dtype=dtype)
    bias = torch.randn(out_features, generator=g, dtype=dtype) if with_bias else None
    return x, weight, bias


@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16), (2, 3, 4, 16)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_backward_matches_autograd_of_f_linear(shape, with_bias):
    x, weight, bias = _inputs(shape, with_bias=with_bias)
    y = linear(x, weight, bias)
    assert y.grad_fn.name().startswith("FrozenLinear")
    want = F.linear(x, weight, bias)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    (want_dx,) = torch.autograd.grad(want, x, dy)
    torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12)


def test_frozen_weight_gets_no_gradient_and_only_the_weight_is_saved():
    x, weight, bias = _inputs()
    y = linear(x, weight, bias)
    assert not weight.requires_grad and weight.grad is None
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0] is weight  # no activation kept for backward
    y.sum().backward()
    assert x.grad is not None and weight.grad is None and bias.grad is None


def test_low_precision_gradient_in_the_input_dtype():
    x, weight, bias = _inputs(dtype=torch.float32)
    x = x.detach().bfloat16().requires_grad_()
    y = linear(x, weight.bfloat16(), bias.bfloat16())
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.dtype == torch.bfloat16


@pytest.mark.parametrize("trainable", ["weight", "bias"])
def test_trainable_parameters_take_autograd_path(trainable):
    x, weight, bias = _inputs()
    (weight if trainable == "weight" else bias).requires_grad_()
    y = linear(x, weight, bias)
    assert "FrozenLinear" not in y.grad_fn.name()
    y.sum().backward()
    assert (weight if trainable == "weight" else bias).grad is not None


def test_input_without_gradient_takes_f_linear():
    x, weight, bias = _inputs()
    y = linear(x.detach(), weight, bias)
    assert y.grad_fn is None
    torch.testing.assert_close(y, F.linear(x.detach(), weight, bias), rtol=0, atol=0)
