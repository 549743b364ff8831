"""Sinusoidal representation networks (SIREN; Sitzmann et al., NeurIPS 2020).

A SIREN maps coordinates in ``[-1, 1]^d`` to a value (an intensity, a density, ...) and is used as
an implicit representation of an image or a volume. Its initialisation keeps the pre-activations
of every sine layer approximately standard normal, whatever the depth, which is what makes deep
sine networks trainable.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bioinverse.nn.mlp import _check_positive_int

__all__ = ["SineLayer", "SIREN"]


class _SineAffine(torch.autograd.Function):
    r""":math:`y = \sin(u)`, :math:`u = \omega_0 (x W^\top + b)`, with ω0 folded into the matrix products.

    Autograd would run ``linear``, a multiplication by ω0 and ``sin`` forward, and the same three
    backward; here ω0 rides in the GEMMs' scaling factors (``addmm``'s alpha and beta), which saves
    two passes over the activations per layer (≈ 10 % of a SIREN's training step on a CPU).
    Gradients: :math:`g_u = g_y \cos u`, :math:`g_x = \omega_0 g_u W`,
    :math:`g_W = \omega_0 g_u^\top x`, :math:`g_b = \omega_0 \sum g_u`. First derivatives only.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, omega0):
        if bias is None:
            u = torch.mm(x, weight.t()).mul_(omega0)
        else:
            u = torch.addmm(bias, x, weight.t(), beta=omega0, alpha=omega0)
        ctx.save_for_backward(x, weight, u)
        ctx.omega0 = omega0
        return torch.sin(u)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, u = ctx.saved_tensors
        omega0 = ctx.omega0
        grad_u = torch.cos(u).mul_(grad)
        grad_x = torch.mm(grad_u, weight).mul_(omega0) if ctx.needs_input_grad[0] else None
        grad_weight = torch.mm(grad_u.t(), x).mul_(omega0) if ctx.needs_input_grad[1] else None
        grad_bias = grad_u.sum(0).mul_(omega0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


class SineLayer(nn.Module):
    r"""Affine map followed by a sine: :math:`y = \sin(\omega_0 (W x + b))`.

    Initialisation (Sitzmann et al. 2020, sec. 3.2), with ``n = in_features``:

    * first layer: :math:`W \sim U(-1/n,\ 1/n)`;
    * later layers: :math:`W \sim U(-\sqrt{6/n}/\omega_0,\ \sqrt{6/n}/\omega_0)`, so that
      :math:`\omega_0 W x` has unit variance when ``x`` is arcsine distributed on [-1, 1] (the
      output distribution of a sine layer).

    The bias keeps PyTorch's default ``nn.Linear`` initialisation, :math:`b \sim U(-1/\sqrt n,
    1/\sqrt n)`, as the reference implementation does; it adds :math:`\omega_0^2/(3n)` to the
    variance of the pre-activation.

    Parameters
    ----------
    in_features, out_features : int
        Input and output sizes; ``forward`` maps ``(..., in_features)`` to ``(..., out_features)``.
    omega0 : float, default 30.0
        Frequency factor :math:`\omega_0`.
    is_first : bool, default False
        Use the first-layer initialisation.
    bias : bool, default True
        Learn the bias ``b``.

    Attributes
    ----------
    linear : torch.nn.Linear
        Holds ``W`` and ``b``.

    Examples
    --------
    >>> layer = SineLayer(2, 16, is_first=True)
    >>> y = layer(torch.rand(5, 2) * 2 - 1)
    >>> y.shape, bool(y.abs().max() <= 1)
    (torch.Size([5, 16]), True)
    """

    def __init__(self, in_features: int, out_features: int, omega0: float = 30.0,
                 is_first: bool = False, bias: bool = True):
        super().__init__()
        _check_positive_int(in_features, "in_features")
        _check_positive_int(out_features, "out_features")
        if not omega0 > 0:
            raise ValueError(f"omega0 must be positive, got {omega0!r}")
        self.omega0, self.is_first = float(omega0), is_first
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        bound = 1.0 / in_features if is_first else math.sqrt(6.0 / in_features) / self.omega0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``sin(omega0 * (W x + b))``."""
        flat = x.reshape(-1, x.shape[-1])
        y = _SineAffine.apply(flat, self.linear.weight, self.linear.bias, self.omega0)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class SIREN(nn.Module):
    r"""Sine network: coordinates in :math:`[-1, 1]^d` → value.

    .. math::

        h_0 = \sin(\omega_{0,\text{first}}(W_0 x + b_0)),\quad
        h_k = \sin(\omega_{0,\text{hidden}}(W_k h_{k-1} + b_k)),\quad
        y = W_\text{out} h_K + b_\text{out},

    with ``K = hidden_layers`` and :math:`W_\text{out} \sim U(\pm\sqrt{6/n}/\omega_{0,\text{hidden}})`
    (a :class:`SineLayer` instead when ``outermost_linear`` is false).

    The implicit-representation source uses ω0 = 30 and 3 hidden layers of 128 units in 2-D, and
    ω0 = 50 in 3-D. For 3-D it states 7 × 512 units, but its parameter count, 461,825, matches
    256 hidden units (``SIREN(3, 256, 7, 1)``), not 512.

    Parameters
    ----------
    in_features : int
        Dimension ``d`` of the coordinates.
    hidden_features : int
        Width of every sine layer.
    hidden_layers : int
        Number of sine layers after the first one (``>= 0``).
    out_features : int
        Size of the output value.
    first_omega0, hidden_omega0 : float, default 30.0
        :math:`\omega_0` of the first and of the later sine layers.
    outermost_linear : bool, default True
        End with a linear layer (real-valued output) rather than a sine layer.

    Attributes
    ----------
    net : torch.nn.Sequential
        The layers in order.

    Examples
    --------
    >>> net = SIREN(2, 32, 2, 1)
    >>> net(torch.rand(100, 2) * 2 - 1).shape
    torch.Size([100, 1])
    >>> sum(p.numel() for p in SIREN(3, 256, 7, 1).parameters())
    461825
    """

    def __init__(self, in_features: int, hidden_features: int, hidden_layers: int, out_features: int,
                 first_omega0: float = 30.0, hidden_omega0: float = 30.0,
                 outermost_linear: bool = True):
        super().__init__()
        if isinstance(hidden_layers, bool) or not isinstance(hidden_layers, int) or hidden_layers < 0:
            raise ValueError(f"hidden_layers must be a non-negative integer, got {hidden_layers!r}")
        layers: list[nn.Module] = [SineLayer(in_features, hidden_features, first_omega0, is_first=True)]
        layers += [SineLayer(hidden_features, hidden_features, hidden_omega0)
                   for _ in range(hidden_layers)]
        if outermost_linear:
            _check_positive_int(out_features, "out_features")
            final = nn.Linear(hidden_features, out_features)
            bound = math.sqrt(6.0 / hidden_features) / hidden_omega0
            with torch.no_grad():
                final.weight.uniform_(-bound, bound)
            layers.append(final)
        else:
            layers.append(SineLayer(hidden_features, out_features, hidden_omega0))
        self.net = nn.Sequential(*layers)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """Map coordinates ``(..., in_features)`` to values ``(..., out_features)``."""
        return self.net(coords)
