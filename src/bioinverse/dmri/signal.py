"""Gaussian and cumulant forward models of the diffusion MRI signal.

Conventions (shared by :mod:`bioinverse.dmri`):

* b-values in s/mm², diffusivities in mm²/s; a :class:`~bioinverse.dmri.io.GradientTable` holds the
  ``n`` b-values and unit directions of an acquisition.
* A diffusion tensor ``D`` is a full symmetric array of shape ``(..., 3, 3)``; a kurtosis tensor ``W``
  is a full, fully symmetric, dimensionless array of shape ``(..., 3, 3, 3, 3)`` in the standard
  normalisation of Jensen et al. (2005),

  .. math::

      \\log S(b, \\mathbf g) = \\log S_0 - b \\sum_{ij} g_i g_j D_{ij}
          + \\frac{b^2\\,\\mathrm{MD}^2}{6} \\sum_{ijkl} g_i g_j g_k g_l W_{ijkl},
      \\qquad \\mathrm{MD} = \\operatorname{tr}(D)/3 .

* Signals have the measurement axis last: ``(..., n)``.
* The compact element orders are dipy's: ``(Dxx, Dxy, Dyy, Dxz, Dyz, Dzz)`` and
  ``(Wxxxx, Wyyyy, Wzzzz, Wxxxy, Wxxxz, Wxyyy, Wyyyz, Wxzzz, Wyzzz, Wxxyy, Wxxzz, Wyyzz, Wxxyz,
  Wxyyz, Wxyzz)``.

Every function is vectorised over any leading shape.

References
----------
Jensen JH, Helpern JA, Ramani A, Lu H, Kaczynski K (2005). Diffusional kurtosis imaging: the
quantification of non-Gaussian water diffusion by means of magnetic resonance imaging. Magn Reson
Med 53:1432–1440.

Jensen JH, Helpern JA (2010). MRI quantification of non-Gaussian water diffusion by kurtosis
analysis. NMR Biomed 23:698–710.
"""

from __future__ import annotations

import itertools

import numpy as np
from numpy.typing import ArrayLike

from bioinverse._checks import real_finite_array
from bioinverse.errors import InputError

__all__ = [
    "axially_symmetric_tensor",
    "cumulant_tensors",
    "dki_signal",
    "dti_signal",
    "kurtosis_elements",
    "kurtosis_from_elements",
    "multi_tensor_moments",
    "multi_tensor_signal",
    "rician_noise",
    "tensor_elements",
    "tensor_from_eig",
    "tensor_from_elements",
]

# dipy's element orders (index tuples of the unique elements).
_D_INDICES = ((0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2))
_W_INDICES = (
    (0, 0, 0, 0), (1, 1, 1, 1), (2, 2, 2, 2), (0, 0, 0, 1), (0, 0, 0, 2), (0, 1, 1, 1), (1, 1, 1, 2),
    (0, 2, 2, 2), (1, 2, 2, 2), (0, 0, 1, 1), (0, 0, 2, 2), (1, 1, 2, 2), (0, 0, 1, 2), (0, 1, 1, 2),
    (0, 1, 2, 2),
)  # fmt: skip


def _element_tables(indices: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, np.ndarray]:
    """For a symmetric tensor of order len(indices[0]): full-index → element map and multiplicities."""
    order = len(indices[0])
    lookup = {tuple(sorted(ix)): e for e, ix in enumerate(indices)}
    full = np.empty((3,) * order, dtype=np.intp)
    for ix in itertools.product(range(3), repeat=order):
        full[ix] = lookup[tuple(sorted(ix))]
    multiplicity = np.bincount(full.ravel(), minlength=len(indices)).astype(np.float64)
    return full, multiplicity


_D_FULL, _D_MULT = _element_tables(_D_INDICES)
_W_FULL, _W_MULT = _element_tables(_W_INDICES)
# Averaging matrices full → elements: the mean over every entry of an element's index class, so that a
# slightly asymmetric input (round-off) maps onto its symmetric part.
_D_AVERAGE = np.zeros((9, 6))
_D_AVERAGE[np.arange(9), _D_FULL.ravel()] = 1.0
_D_AVERAGE /= _D_MULT
_W_AVERAGE = np.zeros((81, 15))
_W_AVERAGE[np.arange(81), _W_FULL.ravel()] = 1.0
_W_AVERAGE /= _W_MULT


# --------------------------------------------------------------------------------------------------
# argument checks


def _trailing(a: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    k = len(shape)
    if a.ndim < k or a.shape[a.ndim - k :] != shape:
        want = "(..., " + ", ".join(map(str, shape)) + ")"
        raise InputError(name, f"must have shape {want}, got {a.shape}")


def _tensor(D: ArrayLike, name: str = "D") -> np.ndarray:
    D = real_finite_array(D, name, allow_empty=True)
    _trailing(D, (3, 3), name)
    scale = np.abs(D).max(initial=0.0)
    if np.abs(D - np.swapaxes(D, -1, -2)).max(initial=0.0) > 1e-6 * scale:
        raise InputError(name, "must be symmetric (D[..., i, j] == D[..., j, i])")
    return D


def _kurtosis(W: ArrayLike, name: str = "W") -> np.ndarray:
    W = real_finite_array(W, name, allow_empty=True)
    _trailing(W, (3, 3, 3, 3), name)
    flat = W.reshape(W.shape[:-4] + (81,))
    symmetric = (flat @ _W_AVERAGE)[..., _W_FULL.ravel()]
    if np.abs(flat - symmetric).max(initial=0.0) > 1e-6 * np.abs(flat).max(initial=0.0):
        raise InputError(name, "must be fully symmetric (invariant under any permutation of its 4 indices)")
    return W


def _gradients(gtab) -> tuple[np.ndarray, np.ndarray]:
    """(bvals (n,), bvecs (n, 3)) of a gradient table, validated."""
    try:
        bvals, bvecs = gtab.bvals, gtab.bvecs
    except AttributeError:
        raise InputError("gtab", f"must be a GradientTable (with bvals and bvecs), got {type(gtab).__name__}") from None
    bvals = real_finite_array(bvals, "gtab.bvals", allow_empty=True)
    bvecs = real_finite_array(bvecs, "gtab.bvecs", allow_empty=True)
    if bvals.ndim != 1 or bvecs.shape != (bvals.size, 3):
        raise InputError("gtab", f"bvals {bvals.shape} and bvecs {bvecs.shape} must have shapes (n,) and (n, 3)")
    if (bvals < 0).any():
        raise InputError("gtab.bvals", "contains negative b-values")
    return bvals, bvecs


def _leading_s0(S0: ArrayLike, leading: tuple[int, ...]) -> np.ndarray:
    S0 = real_finite_array(S0, "S0", allow_empty=True)
    if (S0 < 0).any():
        raise InputError("S0", "must be non-negative")
    try:
        return np.broadcast_to(S0, np.broadcast_shapes(S0.shape, leading))
    except ValueError:
        raise InputError("S0", f"shape {S0.shape} does not broadcast to the voxel shape {leading}") from None


# --------------------------------------------------------------------------------------------------
# directional forms


def _quadratic_basis(g: np.ndarray) -> np.ndarray:
    """(n, 6): ``g_i g_j`` times the multiplicity of each unique element, so that ``basis @ d6 = gᵀDg``."""
    return np.stack([g[:, i] * g[:, j] for i, j in _D_INDICES], axis=-1) * _D_MULT


def _quartic_basis(g: np.ndarray) -> np.ndarray:
    """(n, 15): ``g_i g_j g_k g_l`` times multiplicity, so that ``basis @ w15 = Σ g g g g W``."""
    return np.stack([g[:, i] * g[:, j] * g[:, k] * g[:, l] for i, j, k, l in _W_INDICES], axis=-1) * _W_MULT


# --------------------------------------------------------------------------------------------------
# element orders


def tensor_from_elements(d6: ArrayLike) -> np.ndarray:
    """Full symmetric diffusion tensors from their 6 unique elements.

    Parameters
    ----------
    d6 : array_like, shape (..., 6)
        ``(Dxx, Dxy, Dyy, Dxz, Dyz, Dzz)`` in mm²/s (dipy's lower-triangular order).

    Returns
    -------
    D : ndarray, shape (..., 3, 3)
        :math:`D_{ij} = D_{ji}`.

    Examples
    --------
    >>> tensor_from_elements([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).tolist()
    [[1.0, 2.0, 4.0], [2.0, 3.0, 5.0], [4.0, 5.0, 6.0]]
    """
    d6 = real_finite_array(d6, "d6", allow_empty=True)
    _trailing(d6, (6,), "d6")
    return d6[..., _D_FULL]


def tensor_elements(D: ArrayLike) -> np.ndarray:
    """The 6 unique elements ``(Dxx, Dxy, Dyy, Dxz, Dyz, Dzz)`` of symmetric tensors ``(..., 3, 3)``.

    The inverse of :func:`tensor_from_elements`; off-diagonal elements are the mean of
    :math:`D_{ij}` and :math:`D_{ji}`.

    Examples
    --------
    >>> D = tensor_from_elements([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    >>> tensor_elements(D).tolist()
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    """
    D = real_finite_array(D, "D", allow_empty=True)
    _trailing(D, (3, 3), "D")
    return D.reshape(D.shape[:-2] + (9,)) @ _D_AVERAGE


def kurtosis_from_elements(w15: ArrayLike) -> np.ndarray:
    """Full fully symmetric kurtosis tensors from their 15 unique elements.

    Parameters
    ----------
    w15 : array_like, shape (..., 15)
        ``(Wxxxx, Wyyyy, Wzzzz, Wxxxy, Wxxxz, Wxyyy, Wyyyz, Wxzzz, Wyzzz, Wxxyy, Wxxzz, Wyyzz,
        Wxxyz, Wxyyz, Wxyzz)`` (dipy's order), dimensionless.

    Returns
    -------
    W : ndarray, shape (..., 3, 3, 3, 3)
        :math:`W_{ijkl}` equal for every permutation of :math:`(i, j, k, l)`.

    Examples
    --------
    >>> W = kurtosis_from_elements(range(15))
    >>> float(W[0, 1, 0, 0]), float(W[2, 1, 0, 2]), float(W[1, 2, 2, 0])
    (3.0, 14.0, 14.0)
    """
    w15 = real_finite_array(w15, "w15", allow_empty=True)
    _trailing(w15, (15,), "w15")
    return w15[..., _W_FULL]


def kurtosis_elements(W: ArrayLike) -> np.ndarray:
    """The 15 unique elements of fully symmetric tensors ``(..., 3, 3, 3, 3)``, in dipy's order.

    The inverse of :func:`kurtosis_from_elements`; each element is the mean over its index class
    (the projection onto fully symmetric tensors).

    Examples
    --------
    >>> kurtosis_elements(kurtosis_from_elements(range(15))).round(12).tolist()[-4:]
    [11.0, 12.0, 13.0, 14.0]
    """
    W = real_finite_array(W, "W", allow_empty=True)
    _trailing(W, (3, 3, 3, 3), "W")
    return W.reshape(W.shape[:-4] + (81,)) @ _W_AVERAGE


def tensor_from_eig(evals: ArrayLike, evecs: ArrayLike) -> np.ndarray:
    """Diffusion tensors from eigenvalues and eigenvectors.

    .. math::

        D = V \\,\\operatorname{diag}(\\lambda)\\, V^\\mathsf{T}

    Parameters
    ----------
    evals : array_like, shape (..., 3)
        Eigenvalues in mm²/s.
    evecs : array_like, shape (..., 3, 3)
        Eigenvectors as columns (``evecs[..., :, k]`` belongs to ``evals[..., k]``); orthonormal.

    Returns
    -------
    D : ndarray, shape (..., 3, 3)

    Examples
    --------
    >>> import numpy as np
    >>> R = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    >>> (tensor_from_eig([3e-3, 1e-3, 1e-3], R) * 1e3).round(6).tolist()
    [[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]
    """
    evals = real_finite_array(evals, "evals", allow_empty=True)
    evecs = real_finite_array(evecs, "evecs", allow_empty=True)
    _trailing(evals, (3,), "evals")
    _trailing(evecs, (3, 3), "evecs")
    gram = np.swapaxes(evecs, -1, -2) @ evecs
    if np.abs(gram - np.eye(3)).max() > 1e-6:
        raise InputError("evecs", "columns must be orthonormal")
    return (evecs * evals[..., None, :]) @ np.swapaxes(evecs, -1, -2)


def axially_symmetric_tensor(direction: ArrayLike, d_par: ArrayLike, d_perp: ArrayLike) -> np.ndarray:
    """Axially symmetric (cylindrical) diffusion tensors.

    .. math::

        D = d_\\perp I + (d_\\parallel - d_\\perp)\\, \\mathbf u \\mathbf u^\\mathsf{T},
        \\qquad \\mathbf u = \\text{direction} / \\lVert\\text{direction}\\rVert

    Parameters
    ----------
    direction : array_like, shape (..., 3)
        Symmetry axis (normalised here; must not be zero).
    d_par, d_perp : array_like, broadcastable to the leading shape
        Diffusivities along and across the axis, mm²/s.

    Returns
    -------
    D : ndarray, shape (..., 3, 3)

    Examples
    --------
    >>> D = axially_symmetric_tensor([0.0, 0.0, 2.0], 2e-3, 0.5e-3)
    >>> (D.diagonal() * 1e3).tolist()
    [0.5, 0.5, 2.0]
    """
    u = real_finite_array(direction, "direction", allow_empty=True)
    _trailing(u, (3,), "direction")
    norm = np.linalg.norm(u, axis=-1, keepdims=True)
    if (norm == 0).any():
        raise InputError("direction", "contains a zero vector")
    u = u / norm
    d_par = real_finite_array(d_par, "d_par", allow_empty=True)[..., None, None]
    d_perp = real_finite_array(d_perp, "d_perp", allow_empty=True)[..., None, None]
    return d_perp * np.eye(3) + (d_par - d_perp) * (u[..., :, None] * u[..., None, :])


# --------------------------------------------------------------------------------------------------
# forward models


def dti_signal(gtab, D: ArrayLike, S0: ArrayLike = 1.0) -> np.ndarray:
    """Signal of a single Gaussian compartment (the diffusion tensor model).

    .. math::

        S(b, \\mathbf g) = S_0 \\exp(-b\\, \\mathbf g^\\mathsf{T} D \\mathbf g)

    (Basser, Mattiello & LeBihan 1994, Biophys J 66:259–267.)

    Parameters
    ----------
    gtab : GradientTable
        ``n`` b-values (s/mm²) and unit directions.
    D : array_like, shape (..., 3, 3)
        Symmetric diffusion tensors, mm²/s.
    S0 : float or array_like broadcastable to the leading shape
        Non-diffusion-weighted signal.

    Returns
    -------
    S : ndarray, shape (..., n)

    Examples
    --------
    >>> import numpy as np
    >>> from bioinverse.dmri.io import GradientTable
    >>> gtab = GradientTable(np.array([0.0, 1000.0, 1000.0]), np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1.0]]))
    >>> dti_signal(gtab, np.diag([1e-3, 1e-3, 2e-3])).round(4).tolist()
    [1.0, 0.3679, 0.1353]
    """
    bvals, bvecs = _gradients(gtab)
    D = _tensor(D)
    S0 = _leading_s0(S0, D.shape[:-2])
    adc = tensor_elements(D) @ _quadratic_basis(bvecs).T
    return S0[..., None] * np.exp(-bvals * adc)


def dki_signal(gtab, D: ArrayLike, W: ArrayLike, S0: ArrayLike = 1.0) -> np.ndarray:
    """Signal of the diffusion kurtosis (second-order cumulant) model.

    .. math::

        S(b, \\mathbf g) = S_0 \\exp\\Big(-b\\, D(\\mathbf g)
            + \\tfrac{1}{6} b^2 \\mathrm{MD}^2 W(\\mathbf g)\\Big),\\quad
        D(\\mathbf g) = \\sum_{ij} g_i g_j D_{ij},\\quad
        W(\\mathbf g) = \\sum_{ijkl} g_i g_j g_k g_l W_{ijkl},\\quad \\mathrm{MD} = \\operatorname{tr} D/3

    (Jensen et al. 2005.) The apparent kurtosis is :math:`K(\\mathbf g) = \\mathrm{MD}^2 W(\\mathbf g) /
    D(\\mathbf g)^2`.

    Parameters
    ----------
    gtab : GradientTable
    D : array_like, shape (..., 3, 3)
        Diffusion tensors, mm²/s.
    W : array_like, shape (..., 3, 3, 3, 3)
        Fully symmetric kurtosis tensors (dimensionless); leading shape broadcastable with ``D``'s.
    S0 : float or array_like broadcastable to the leading shape

    Returns
    -------
    S : ndarray, shape (..., n)

    Examples
    --------
    >>> import numpy as np
    >>> from bioinverse.dmri.io import GradientTable
    >>> gtab = GradientTable(np.array([0.0, 1000.0, 2000.0]), np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0.0]]))
    >>> W = kurtosis_from_elements([1, 1, 1, 0, 0, 0, 0, 0, 0, 1/3, 1/3, 1/3, 0, 0, 0])  # K = 1
    >>> dki_signal(gtab, np.eye(3) * 1e-3, W).round(4).tolist()
    [1.0, 0.4346, 0.2636]
    """
    bvals, bvecs = _gradients(gtab)
    D = _tensor(D)
    W = _kurtosis(W)
    try:
        leading = np.broadcast_shapes(D.shape[:-2], W.shape[:-4])
    except ValueError:
        raise InputError("W", f"leading shape {W.shape[:-4]} does not broadcast with D's {D.shape[:-2]}") from None
    S0 = _leading_s0(S0, leading)
    md = np.trace(D, axis1=-2, axis2=-1) / 3
    adc = tensor_elements(D) @ _quadratic_basis(bvecs).T
    adv = (md**2)[..., None] * (kurtosis_elements(W) @ _quartic_basis(bvecs).T)
    return S0[..., None] * np.exp(-bvals * adc + bvals**2 * adv / 6)


def _mixture(fractions: ArrayLike, tensors: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    f = real_finite_array(fractions, "fractions", allow_empty=True)
    T = _tensor(tensors, "tensors")
    if f.ndim < 1:
        raise InputError("fractions", "must have shape (..., m)")
    if T.ndim < 3 or T.shape[-3] != f.shape[-1]:
        raise InputError("tensors", f"must have shape (..., m, 3, 3) with m = {f.shape[-1]}, got {T.shape}")
    if (f < 0).any():
        raise InputError("fractions", "must be non-negative")
    total = f.sum(axis=-1)
    if np.abs(total - 1).max() > 1e-6:
        raise InputError("fractions", f"must sum to 1 over the last axis (found sums up to {total.max():.6g})")
    try:
        np.broadcast_shapes(f.shape[:-1], T.shape[:-3])
    except ValueError:
        raise InputError("tensors", f"leading shape {T.shape[:-3]} does not broadcast with fractions' {f.shape[:-1]}") from None
    return f, T


def multi_tensor_signal(gtab, fractions: ArrayLike, tensors: ArrayLike, S0: ArrayLike = 1.0) -> np.ndarray:
    """Signal of a mixture of non-exchanging Gaussian compartments.

    .. math::

        S(b, \\mathbf g) = S_0 \\sum_{c=1}^{m} f_c \\exp(-b\\, \\mathbf g^\\mathsf{T} D_c \\mathbf g)

    Parameters
    ----------
    gtab : GradientTable
    fractions : array_like, shape (..., m)
        Signal fractions, each ≥ 0, summing to 1 (within 1e-6) over the last axis.
    tensors : array_like, shape (..., m, 3, 3)
        Compartment diffusion tensors, mm²/s.
    S0 : float or array_like broadcastable to the leading shape

    Returns
    -------
    S : ndarray, shape (..., n)

    Examples
    --------
    >>> import numpy as np
    >>> from bioinverse.dmri.io import GradientTable
    >>> gtab = GradientTable(np.array([0.0, 1000.0]), np.array([[0, 0, 0], [1, 0, 0.0]]))
    >>> tensors = np.stack([np.eye(3) * 1e-3, np.eye(3) * 3e-3])
    >>> multi_tensor_signal(gtab, [0.5, 0.5], tensors).round(4).tolist()
    [1.0, 0.2088]
    """
    bvals, bvecs = _gradients(gtab)
    f, T = _mixture(fractions, tensors)
    leading = np.broadcast_shapes(f.shape[:-1], T.shape[:-3])
    S0 = _leading_s0(S0, leading)
    adc = tensor_elements(T) @ _quadratic_basis(bvecs).T  # (..., m, n)
    return S0[..., None] * np.einsum("...c,...cn->...n", f, np.exp(-bvals * adc))


def multi_tensor_moments(fractions: ArrayLike, tensors: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """First two moments of the compartment diffusion-tensor distribution of a mixture.

    .. math::

        M_1 = \\sum_c f_c D_c, \\qquad (M_2)_{ijkl} = \\sum_c f_c (D_c)_{ij} (D_c)_{kl}

    Pass them to :func:`cumulant_tensors` for the mixture's exact diffusion and kurtosis tensors.

    Parameters
    ----------
    fractions : array_like, shape (..., m)
        Signal fractions (≥ 0, summing to 1).
    tensors : array_like, shape (..., m, 3, 3)
        Compartment diffusion tensors, mm²/s.

    Returns
    -------
    M1 : ndarray, shape (..., 3, 3)
        mm²/s.
    M2 : ndarray, shape (..., 3, 3, 3, 3)
        mm⁴/s².

    Examples
    --------
    >>> import numpy as np
    >>> M1, M2 = multi_tensor_moments([0.5, 0.5], np.stack([np.eye(3), 3 * np.eye(3)]))
    >>> float(M1[0, 0]), float(M2[0, 0, 0, 0]), float(M2[0, 1, 0, 1])
    (2.0, 5.0, 0.0)
    """
    f, T = _mixture(fractions, tensors)
    M1 = np.einsum("...c,...cij->...ij", f, T)
    M2 = np.einsum("...c,...cij,...ckl->...ijkl", f, T, T)
    return M1, M2


def _symmetrise_pairings(T: np.ndarray) -> np.ndarray:
    """``(T_ijkl + T_ikjl + T_iljk) / 3``: full symmetrisation of a tensor symmetric within its pairs."""
    return (T + np.einsum("...ikjl->...ijkl", T) + np.einsum("...iljk->...ijkl", T)) / 3


def cumulant_tensors(M1: ArrayLike, M2: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Exact diffusion and kurtosis tensors of a voxel made of Gaussian compartments.

    For a (possibly continuous) mixture of Gaussian compartments with diffusion tensors
    :math:`D_c`, the cumulant expansion of :math:`\\log S` gives :math:`D = E[D_c] = M_1` and
    :math:`\\tfrac{1}{6} b^2 \\mathrm{MD}^2 W(\\mathbf g) = \\tfrac{1}{2} b^2 \\operatorname{Var}[\\mathbf g^\\mathsf{T} D_c \\mathbf g]`
    (Jensen & Helpern 2010), i.e.

    .. math::

        W_{ijkl} = \\frac{3}{\\mathrm{MD}^2}\\Big(\\mathcal S(M_2)_{ijkl} - \\mathcal S(D \\otimes D)_{ijkl}\\Big),
        \\qquad \\mathcal S(T)_{ijkl} = \\tfrac{1}{3}(T_{ijkl} + T_{ikjl} + T_{iljk}),

    with :math:`\\mathrm{MD} = \\operatorname{tr}(D)/3`. Where MD = 0, W is set to 0.

    Parameters
    ----------
    M1 : array_like, shape (..., 3, 3)
        Mean compartment tensor :math:`E[D_c]`, mm²/s.
    M2 : array_like, shape (..., 3, 3, 3, 3)
        Second moment :math:`E[D_c \\otimes D_c]`, mm⁴/s²; leading shape broadcastable with ``M1``'s.

    Returns
    -------
    D : ndarray, shape (..., 3, 3)
    W : ndarray, shape (..., 3, 3, 3, 3)

    Examples
    --------
    Two isotropic compartments with diffusivities 1 and 3 µm²/ms, half each: K = 3 Var/MD² = 0.75.

    >>> import numpy as np
    >>> D, W = cumulant_tensors(*multi_tensor_moments([0.5, 0.5], np.stack([np.eye(3), 3 * np.eye(3)]) * 1e-3))
    >>> round(float(D[0, 0] * 1e3), 6), round(float(W[0, 0, 0, 0]), 6), round(float(W[0, 0, 1, 1]), 6)
    (2.0, 0.75, 0.25)
    """
    M1 = real_finite_array(M1, "M1", allow_empty=True)
    M2 = real_finite_array(M2, "M2", allow_empty=True)
    _trailing(M1, (3, 3), "M1")
    _trailing(M2, (3, 3, 3, 3), "M2")
    try:
        np.broadcast_shapes(M1.shape[:-2], M2.shape[:-4])
    except ValueError:
        raise InputError("M2", f"leading shape {M2.shape[:-4]} does not broadcast with M1's {M1.shape[:-2]}") from None
    D = (M1 + np.swapaxes(M1, -1, -2)) / 2
    md2 = (np.trace(D, axis1=-2, axis2=-1) / 3) ** 2
    outer = D[..., :, :, None, None] * D[..., None, None, :, :]
    excess = _symmetrise_pairings(M2) - _symmetrise_pairings(outer)
    scale = np.divide(3.0, md2, out=np.zeros_like(md2), where=md2 > 0)
    return D, scale[..., None, None, None, None] * excess


def rician_noise(
    signal: ArrayLike,
    snr: ArrayLike,
    s0: ArrayLike = 1.0,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Magnitude signals with Rician noise.

    .. math::

        \\tilde S = \\big| S + \\sigma n_1 + i\\, \\sigma n_2 \\big|, \\qquad
        n_1, n_2 \\sim \\mathcal N(0, 1), \\qquad \\sigma = s_0 / \\mathrm{SNR}

    (Gudbjartsson & Patz 1995, Magn Reson Med 34:910–914.) The SNR is relative to the unweighted
    signal :math:`s_0`, so :math:`E[\\tilde S^2] = S^2 + 2\\sigma^2`.

    Parameters
    ----------
    signal : array_like, shape (..., n)
        Noise-free magnitude signals.
    snr : float or array_like broadcastable to the leading shape
        Signal-to-noise ratio of ``s0``; > 0.
    s0 : float or array_like broadcastable to the leading shape
        Reference (unweighted) signal of each voxel, or one scalar for the whole image; ≥ 0.
    rng : numpy.random.Generator, int or None
        Random generator or seed.

    Returns
    -------
    noisy : ndarray, shape (..., n)

    Examples
    --------
    >>> import numpy as np
    >>> noisy = rician_noise(np.zeros((1000, 100)), snr=10.0, rng=0)
    >>> round(float(np.sqrt(np.mean(noisy**2) / 2)), 2)  # σ recovered from pure noise
    0.1
    """
    S = real_finite_array(signal, "signal", allow_empty=True)
    if S.ndim < 1:
        raise InputError("signal", "must have shape (..., n)")
    snr = real_finite_array(snr, "snr", allow_empty=True)
    if (snr <= 0).any():
        raise InputError("snr", "must be > 0")
    s0 = real_finite_array(s0, "s0", allow_empty=True)
    if (s0 < 0).any():
        raise InputError("s0", "must be non-negative")
    leading = S.shape[:-1]
    try:
        sigma = np.broadcast_to(s0 / snr, np.broadcast_shapes((s0 / snr).shape, leading))
    except ValueError:
        raise InputError("s0", f"s0 {s0.shape} and snr {snr.shape} must broadcast to the voxel shape {leading}") from None
    if sigma.shape != leading:
        raise InputError("s0", f"s0 {s0.shape} and snr {snr.shape} must broadcast to the voxel shape {leading}")
    rng = np.random.default_rng(rng)
    sigma = sigma[..., None]
    real = S + sigma * rng.standard_normal(S.shape)
    imag = sigma * rng.standard_normal(S.shape)
    return np.hypot(real, imag)
