"""The contrast transfer function (CTF) of a transmission electron microscope, as RELION 3.1 computes it.

The CTF multiplies the Fourier transform of a projection image. RELION 3.1 (``src/ctf.h``,
``CTF::getCTF``; constants set in ``src/ctf.cpp``, ``CTF::initialise``) evaluates, at the spatial
frequency :math:`\\mathbf{k} = (k_x, k_y)` in 1/Å with :math:`u^2 = k_x^2 + k_y^2`,

.. math::

    \\gamma(\\mathbf{k}) = K_1\\, \\Delta f(\\theta)\\, u^2 + K_2\\, u^4 - K_5 - K_3, \\qquad
    \\mathrm{CTF}(\\mathbf{k}) = -\\,s\\, \\sin\\gamma(\\mathbf{k})\\; e^{K_4 u^2},

    K_1 = \\pi\\lambda, \\quad K_2 = \\tfrac{\\pi}{2} C_s \\lambda^3, \\quad
    K_3 = \\arctan\\frac{Q}{\\sqrt{1 - Q^2}}, \\quad K_4 = -\\frac{B}{4}, \\quad K_5 = \\varphi,

    \\Delta f(\\theta) = -\\frac{U + V}{2} - \\frac{U - V}{2} \\cos 2(\\theta - \\alpha), \\qquad
    \\theta = \\operatorname{atan2}(k_y, k_x),

with the relativistic electron wavelength :math:`\\lambda` of :func:`electron_wavelength`, ``Cs`` in
Å (mm · 10⁷), amplitude contrast ``Q``, B-factor ``B`` in Å², phase-plate shift :math:`\\varphi` in
radians (given in degrees, as ``rlnPhaseShift``), astigmatism angle :math:`\\alpha` (``rlnDefocusAngle``,
from the x axis to ``U``, degrees) and scale ``s`` (``rlnCtfScalefactor``).

Conventions worth knowing (all RELION's):

* Defocus ``U``, ``V`` are positive for underfocus; RELION stores their *negatives* in
  :math:`\\Delta f` so the CTF is positive at low frequency: :math:`\\mathrm{CTF}(0) = s\\,Q` (no
  phase plate), rising towards the first peak. There is no extra phase flip: images in RELION are
  expected with white (positive) particles.
* RELION 3.1 writes the astigmatic term as the bilinear form
  :math:`-(\\mathbf{k}^T R_\\alpha^T \\operatorname{diag}(U, V) R_\\alpha \\mathbf{k})`, which equals
  :math:`\\Delta f(\\theta) u^2` above and has no singularity at :math:`\\mathbf{k} = 0`; this module
  evaluates the same form.
* :math:`K_3 = \\arctan(Q/\\sqrt{1-Q^2}) = \\arcsin Q`, evaluated here as ``arctan2(Q, sqrt(1 - Q²))``
  so that ``Q = 1`` gives :math:`\\pi/2` (RELION's ``atan(+inf)``) without a division by zero.
  ``Q`` outside [0, 1] is refused, as RELION does.
* RELION never returns a CTF value smaller than 10⁻⁸ in magnitude (it replaces ``c`` by
  ``sgn(c) · 1e-8``, with ``sgn(0) = +1``, to protect divisions in its GPU code); so does
  :func:`ctf`.
* The per-optics-group anisotropic magnification matrices and the symmetric (even) Zernike
  aberrations of RELION 3.1's observation model are not modelled (they are absent unless a data set
  was refined with CTF refinement's aberration or magnification options).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from bioinverse._checks import positive_number, real_finite_array
from bioinverse.errors import InputError

__all__ = ["ctf", "ctf_image", "electron_wavelength", "half_plane_frequencies"]

# RELION 3.1 src/ctf.h, CTF::getCTF: |CTF| is never below this (sign kept, sgn(0) = +1).
_RELION_MIN_ABS_CTF = 1e-8


def electron_wavelength(voltage_kv: ArrayLike) -> float | np.ndarray:
    """Relativistic wavelength of electrons accelerated through ``voltage_kv`` kilovolts, in Å.

    RELION 3.1, ``src/ctf.cpp``, ``CTF::initialise``:

    .. math::

        \\lambda = \\frac{12.2643247}{\\sqrt{V\\,(1 + 0.978466 \\times 10^{-6}\\, V)}}\\ \\text{Å},
        \\qquad V \\text{ in volts},

    i.e. :math:`h / \\sqrt{2 m_0 e V (1 + e V / 2 m_0 c^2)}` (Reimer & Kohl, *Transmission Electron
    Microscopy*, 5th ed., Springer 2008, eq. 2.5).

    Parameters
    ----------
    voltage_kv : float or array_like
        Acceleration voltage in kV (positive).

    Returns
    -------
    float or ndarray
        Wavelength in Å (a float for a scalar input, else an array of the input's shape).

    Examples
    --------
    >>> print(f"{electron_wavelength(300):.5f} {electron_wavelength(200):.5f}")
    0.01969 0.02508
    """
    kv = real_finite_array(voltage_kv, "voltage_kv")
    if (kv <= 0).any():
        raise InputError("voltage_kv", "must be positive (kV)")
    volts = kv * 1e3
    lam = 12.2643247 / np.sqrt(volts * (1.0 + volts * 0.978466e-6))
    return float(lam) if lam.ndim == 0 else lam


def _particle_parameter(value: ArrayLike, name: str) -> np.ndarray:
    a = real_finite_array(value, name)
    if a.ndim > 1:
        raise InputError(
            name, f"must be a scalar or a 1-D array (one value per particle), got shape {a.shape}"
        )
    return np.atleast_1d(a)


def ctf(
    frequencies: ArrayLike,
    defocus_u: ArrayLike,
    defocus_v: ArrayLike,
    defocus_angle: ArrayLike,
    voltage: ArrayLike,
    spherical_aberration: ArrayLike,
    amplitude_contrast: ArrayLike,
    bfactor: ArrayLike = 0.0,
    phase_shift: ArrayLike = 0.0,
    scale: ArrayLike = 1.0,
) -> np.ndarray:
    """RELION 3.1's CTF (``src/ctf.h``, ``CTF::getCTF``) at given spatial frequencies.

    .. math::

        \\mathrm{CTF}(\\mathbf{k}) = -\\,s\\, e^{-B u^2 / 4} \\sin\\!\\Big(
        \\pi\\lambda\\, \\Delta f(\\theta)\\, u^2 + \\tfrac{\\pi}{2} C_s \\lambda^3 u^4
        - \\varphi - \\arcsin Q \\Big),

        \\Delta f(\\theta) = -\\frac{U + V}{2} - \\frac{U - V}{2}\\cos 2(\\theta - \\alpha)

    (see the module docstring for every symbol and convention). Values of magnitude below 10⁻⁸ are
    replaced by ±10⁻⁸ as RELION does.

    Parameters
    ----------
    frequencies : array_like, shape (n_pix, 2)
        Spatial frequencies ``(kx, ky)`` in 1/Å (e.g. from :func:`half_plane_frequencies`).
    defocus_u, defocus_v : float or array_like (n_particles,)
        Defocus along the two principal axes, Å, positive for underfocus (``rlnDefocusU/V``).
    defocus_angle : float or array_like (n_particles,)
        Angle from the x axis to the ``U`` axis, degrees (``rlnDefocusAngle``).
    voltage : float or array_like (n_particles,)
        Acceleration voltage, kV (``rlnVoltage``).
    spherical_aberration : float or array_like (n_particles,)
        Cs, mm (``rlnSphericalAberration``).
    amplitude_contrast : float or array_like (n_particles,)
        Q in [0, 1] (``rlnAmplitudeContrast``).
    bfactor : float or array_like (n_particles,), optional
        CTF B-factor, Å² (``rlnCtfBfactor``); positive values damp high frequencies.
    phase_shift : float or array_like (n_particles,), optional
        Phase-plate shift, degrees (``rlnPhaseShift``).
    scale : float or array_like (n_particles,), optional
        Overall scale (``rlnCtfScalefactor``).

    Returns
    -------
    ndarray, shape (n_particles, n_pix), float32
        One row per particle; ``n_particles`` is the broadcast length of the particle parameters
        (1 when all are scalars). Computed in float64.

    Raises
    ------
    InputError
        Non-finite values, wrong shapes, parameters of different lengths, non-positive voltage,
        ``Q`` outside [0, 1], or ``U = V = Q = Cs = 0`` (RELION: "CTF initialises to all-zero
        values").

    Examples
    --------
    >>> k = np.array([[0.0, 0.0], [0.05, 0.0], [0.0, 0.05]])
    >>> c = ctf(k, defocus_u=15000, defocus_v=11000, defocus_angle=0, voltage=300,
    ...         spherical_aberration=2.7, amplitude_contrast=0.1)
    >>> c.shape, c.dtype
    ((1, 3), dtype('float32'))
    >>> print(np.round(c[0], 4))
    [0.1    0.6624 0.9741]
    """
    k = real_finite_array(frequencies, "frequencies")
    if k.ndim != 2 or k.shape[1] != 2:
        raise InputError("frequencies", f"must have shape (n_pix, 2) holding (kx, ky) in 1/Å, got {k.shape}")
    names = (
        "defocus_u", "defocus_v", "defocus_angle", "voltage", "spherical_aberration",
        "amplitude_contrast", "bfactor", "phase_shift", "scale",
    )  # fmt: skip
    values = (
        defocus_u, defocus_v, defocus_angle, voltage, spherical_aberration,
        amplitude_contrast, bfactor, phase_shift, scale,
    )  # fmt: skip
    params = [_particle_parameter(v, n) for v, n in zip(values, names)]
    lengths = {p.size for p in params} - {1}
    if len(lengths) > 1:
        given = ", ".join(f"{n}: {p.size}" for n, p in zip(names, params) if p.size != 1)
        raise InputError("ctf", f"per-particle parameters have different lengths ({given})")
    du, dv, angle, kv, cs, q, bfac, phase, scl = (p[:, None] for p in params)
    if (kv <= 0).any():
        raise InputError("voltage", "must be positive (kV)")
    if ((q < 0) | (q > 1)).any():
        raise InputError("amplitude_contrast", "must lie in [0, 1]")
    all_zero = (np.abs(du) < 1e-6) & (np.abs(dv) < 1e-6) & (np.abs(q) < 1e-6) & (np.abs(cs) < 1e-6)
    if all_zero.any():
        raise InputError("ctf", "defocus, amplitude contrast and Cs are all zero: the CTF would vanish")

    lam = electron_wavelength(kv)
    k1 = math.pi * lam
    k2 = 0.5 * math.pi * (cs * 1e7) * lam**3
    k3 = np.arctan2(q, np.sqrt(1.0 - q * q))
    k4 = -0.25 * bfac
    k5 = np.deg2rad(phase)

    # RELION 3.1's bilinear form A = Rᵀ diag(-U, -V) R with R = [[cos α, sin α], [-sin α, cos α]].
    alpha = np.deg2rad(angle)
    cos_a, sin_a = np.cos(alpha), np.sin(alpha)
    axx = -(du * cos_a**2 + dv * sin_a**2)
    axy = (dv - du) * sin_a * cos_a
    ayy = -(du * sin_a**2 + dv * cos_a**2)

    kx, ky = k[:, 0][None, :], k[:, 1][None, :]
    u2 = kx * kx + ky * ky
    gamma = k1 * (axx * kx * kx + 2.0 * axy * kx * ky + ayy * ky * ky) + k2 * u2 * u2 - k5 - k3
    values_out = -np.sin(gamma)
    damp = bfac[:, 0] != 0
    if damp.any():
        values_out[damp] *= np.exp(k4[damp] * u2)
    values_out *= scl
    tiny = np.abs(values_out) < _RELION_MIN_ABS_CTF
    values_out[tiny] = np.where(values_out[tiny] < 0, -_RELION_MIN_ABS_CTF, _RELION_MIN_ABS_CTF)
    return values_out.astype(np.float32)


def half_plane_frequencies(box: int, pixel_size: float) -> np.ndarray:
    """Spatial frequencies of the rfft2 half-plane of an ``box × box`` image, in 1/Å.

    Layout of :func:`numpy.fft.rfft2`: rows are ``ky`` in FFT order
    (0, 1, …, N/2 − 1, −N/2, …, −1), columns ``kx = 0 … N/2``, each divided by ``N · pixel_size``.

    Parameters
    ----------
    box : int
        Image side N (even, ≥ 2).
    pixel_size : float
        Å per pixel.

    Returns
    -------
    ndarray, shape (N, N//2 + 1, 2), float64
        ``[..., 0] = kx``, ``[..., 1] = ky``.

    Examples
    --------
    >>> f = half_plane_frequencies(4, 2.0)
    >>> f.shape
    (4, 3, 2)
    >>> print(f[:, 0, 1], f[0, :, 0])
    [ 0.     0.125 -0.25  -0.125] [0.    0.125 0.25 ]
    """
    n = _check_box(box)
    d = positive_number(pixel_size, "pixel_size", unit="Å")
    ky = np.fft.fftfreq(n, d=d)
    kx = np.fft.rfftfreq(n, d=d)
    grid = np.empty((n, n // 2 + 1, 2), dtype=np.float64)
    grid[..., 0] = kx[None, :]
    grid[..., 1] = ky[:, None]
    return grid


def _check_box(box: int) -> int:
    if isinstance(box, bool) or not isinstance(box, (int, np.integer)) or box < 2 or box % 2:
        raise InputError("box", f"must be an even integer ≥ 2, got {box!r}")
    return int(box)


def ctf_image(
    box: int,
    pixel_size: float,
    defocus_u: float,
    defocus_v: float,
    defocus_angle: float,
    voltage: float,
    spherical_aberration: float,
    amplitude_contrast: float,
    bfactor: float = 0.0,
    phase_shift: float = 0.0,
    scale: float = 1.0,
) -> np.ndarray:
    """The CTF of one particle on the rfft2 half-plane of a ``box × box`` image.

    Equivalent to RELION's ``CTF::getFftwImage`` (``src/ctf.cpp``) except on the Nyquist row: the
    layout here is NumPy's (row ``N/2`` is ``ky = −N/2``), whereas RELION evaluates that row at
    ``ky = +N/2``. The two differ only where the CTF is astigmatic along a diagonal, and RELION zeroes
    that row of its projections anyway.

    Parameters
    ----------
    box : int
        Image side N (even).
    pixel_size : float
        Å per pixel.
    defocus_u, defocus_v, defocus_angle, voltage, spherical_aberration, amplitude_contrast, bfactor, \
phase_shift, scale : float
        As in :func:`ctf` (Å, Å, degrees, kV, mm, fraction, Å², degrees, factor), one particle.

    Returns
    -------
    ndarray, shape (N, N//2 + 1), float32
        Multiply ``np.fft.rfft2(np.fft.ifftshift(image))`` by it to apply the CTF.

    Examples
    --------
    >>> c = ctf_image(64, 1.5, 12000, 12000, 0, 300, 2.7, 0.07)
    >>> c.shape
    (64, 33)
    >>> print(round(float(c[0, 0]), 3), bool(np.allclose(c[1:, 0], c[:0:-1, 0])))
    0.07 True
    """
    freq = half_plane_frequencies(box, pixel_size)
    for name, value in (
        ("defocus_u", defocus_u), ("defocus_v", defocus_v), ("defocus_angle", defocus_angle),
        ("voltage", voltage), ("spherical_aberration", spherical_aberration),
        ("amplitude_contrast", amplitude_contrast), ("bfactor", bfactor),
        ("phase_shift", phase_shift), ("scale", scale),
    ):  # fmt: skip
        if np.ndim(value) != 0:
            raise InputError(name, "must be a scalar (ctf_image draws one particle's CTF)")
    values = ctf(
        freq.reshape(-1, 2), defocus_u, defocus_v, defocus_angle, voltage, spherical_aberration,
        amplitude_contrast, bfactor=bfactor, phase_shift=phase_shift, scale=scale,
    )  # fmt: skip
    return values.reshape(freq.shape[:2])
