import doctest
import math

import pytest
import torch
from torch import nn

import bioinverse.nn.siren as siren_module
from bioinverse.nn import SIREN, SineLayer


def test_docstring_examples_run():
    assert doctest.testmod(siren_module, raise_on_error=False).failed == 0


def test_first_layer_init():
    torch.manual_seed(0)
    w = SineLayer(256, 256, is_first=True).linear.weight
    bound = 1 / 256
    assert w.abs().max() <= bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


@pytest.mark.parametrize("omega0", [30.0, 50.0])
def test_hidden_layer_init(omega0):
    torch.manual_seed(0)
    layer = SineLayer(256, 256, omega0=omega0)
    w = layer.linear.weight
    bound = math.sqrt(6 / 256) / omega0
    assert w.abs().max() <= bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    # the bias keeps PyTorch's default U(-1/sqrt(n), 1/sqrt(n))
    b = layer.linear.bias
    assert b.abs().max() <= 1 / 16 and b.std().item() == pytest.approx(1 / 16 / math.sqrt(3), rel=0.25)


def test_sine_layer_computes_sin_of_scaled_affine_map():
    torch.manual_seed(0)
    layer = SineLayer(3, 5, omega0=7.5)
    x = torch.randn(4, 3)
    expected = torch.sin(7.5 * (x @ layer.linear.weight.T + layer.linear.bias))
    assert torch.allclose(layer(x), expected, atol=1e-6, rtol=0)
    assert SineLayer(3, 5, bias=False).linear.bias is None


def test_hidden_preactivations_are_approximately_standard_normal():
    """Sitzmann et al. (2020): with this initialisation the pre-activations of a hidden sine layer,
    fed by a first sine layer on inputs uniform in [-1, 1], have unit standard deviation."""
    torch.manual_seed(0)
    x = torch.rand(4096, 2) * 2 - 1
    h = SineLayer(2, 256, omega0=30.0, is_first=True)(x)
    assert h.var().item() == pytest.approx(0.5, rel=0.1)  # arcsine distribution on [-1, 1]
    hidden = SineLayer(256, 256, omega0=30.0, bias=False)
    pre = 30.0 * hidden.linear(h)
    assert pre.std().item() == pytest.approx(1.0, rel=0.2)
    # PyTorch's default bias adds omega0**2 / (3 n) to the variance
    with_bias = SineLayer(256, 256, omega0=30.0)
    pre = 30.0 * with_bias.linear(h)
    assert pre.std().item() == pytest.approx(math.sqrt(1 + 30.0**2 / (3 * 256)), rel=0.2)


def test_siren_structure_and_output_shape():
    torch.manual_seed(0)
    net = SIREN(2, 32, 3, 4, first_omega0=30.0, hidden_omega0=20.0)
    assert net(torch.rand(10, 2) * 2 - 1).shape == (10, 4)
    assert net(torch.rand(3, 7, 2)).shape == (3, 7, 4)
    sines = [m for m in net.net if isinstance(m, SineLayer)]
    assert len(sines) == 4 and sines[0].is_first and not any(s.is_first for s in sines[1:])
    assert sines[0].omega0 == 30.0 and all(s.omega0 == 20.0 for s in sines[1:])
    final = net.net[-1]
    assert type(final) is nn.Linear
    assert final.weight.abs().max() <= math.sqrt(6 / 32) / 20.0
    assert isinstance(SIREN(2, 32, 1, 1, outermost_linear=False).net[-1], SineLayer)
    with pytest.raises(ValueError):
        SIREN(2, 32, -1, 1)


def test_siren_fits_a_1d_signal():
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 256).unsqueeze(1)
    y = torch.sin(20 * x) + 0.5 * torch.sin(50 * x)
    net = SIREN(1, 64, 2, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(300):
        opt.zero_grad()
        loss = (net(x) - y).square().mean()
        loss.backward()
        opt.step()
    assert (net(x) - y).square().mean().item() < 1e-3


@pytest.mark.parametrize("bias", [True, False])
def test_sine_layer_gradients_match_finite_differences(bias):
    torch.manual_seed(0)
    layer = SineLayer(3, 5, omega0=7.0, bias=bias).double()
    x = torch.rand(6, 2, 3, dtype=torch.float64, requires_grad=True)  # leading dimensions are kept
    params = (x, layer.linear.weight) + ((layer.linear.bias,) if bias else ())
    assert torch.autograd.gradcheck(lambda *_: layer(x), params)
    assert layer(x).shape == (6, 2, 5)
