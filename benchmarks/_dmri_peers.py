"""The field's tools on bioinverse's arrays: dipy's DKI and AMICO's NODDI, timed as their users run them.

The dMRI benchmark fits the same simulated voxels with bioinverse's estimators and with these
peers, in one process. Both runners take voxel arrays and a protocol (b-values in s/mm², unit
gradient directions) and return NumPy maps plus wall-clock times of the parts a user of the tool
runs; everything a user does once per protocol (gradient tables, files on disk) stays outside the
timers.

* :func:`dipy_dki` — ``dipy.reconst.dki.DiffusionKurtosisModel`` (dipy 1.12.1), weighted linear
  least squares, then dipy's default MK, RK and KFA.
* :func:`amico_noddi` — AMICO's linearised NODDI (dmri-amico 2.1.1): a dictionary of
  Watson-dispersed stick + tortuous zeppelin atoms on the voxel's DTI direction, fitted by NNLS,
  a LASSO and an NNLS debiasing step. Its maps differ from a non-linear NODDI fit by design.

AMICO is licensed for research and education only (AMICO software license agreement, v2), which
is why it is a ``bench`` extra and never a dependency of the package.

Smoke run with a simulated sanity check: ``python -m benchmarks._dmri_peers``.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from bioinverse._checks import real_finite_array
from bioinverse.errors import InputError
from bioinverse.io import atomic_path, write_text

__all__ = ["amico_noddi", "dipy_dki"]

#: b-values at or below it (s/mm²) are b = 0 volumes, as in dipy and bioinverse's GradientTable.
B0_THRESHOLD = 50.0

# AMICO's defaults for the rotation look-up table: SH order 12, 500 directions on the half sphere.
_AMICO_LMAX = 12
_AMICO_NDIRS = 500

# AMICO's NODDI writes fit_<name>.nii.gz; the names in bioinverse's vocabulary.
_AMICO_NODDI_MAPS = {"NDI": "icvf", "ODI": "odi", "FWF": "isovf"}

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _protocol(bvals: ArrayLike, bvecs: ArrayLike, n_volumes: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked b-values (n,) and directions (n, 3) for data with ``n_volumes`` volumes."""
    b = real_finite_array(bvals, "bvals")
    g = real_finite_array(bvecs, "bvecs")
    if b.ndim != 1 or b.shape[0] != n_volumes:
        raise InputError("bvals", f"must have shape ({n_volumes},) to match the data, got {b.shape}")
    if g.shape != (n_volumes, 3):
        raise InputError("bvecs", f"must have shape ({n_volumes}, 3) to match the data, got {g.shape}")
    if (b < 0).any():
        raise InputError("bvals", f"b-values must be non-negative, got minimum {b.min():g} s/mm²")
    weighted = b > B0_THRESHOLD
    norms = np.linalg.norm(g[weighted], axis=1)
    if weighted.any() and np.abs(norms - 1.0).max() > 1e-2:
        raise InputError("bvecs", "directions of the diffusion-weighted volumes must be unit vectors")
    if not weighted.any() or weighted.all():
        raise InputError("bvals", f"need b = 0 volumes (b ≤ {B0_THRESHOLD:g} s/mm²) and weighted ones")
    return b, g


def dipy_dki(data: ArrayLike, bvals: ArrayLike, bvecs: ArrayLike) -> dict[str, np.ndarray | float]:
    """Fit dipy's diffusion kurtosis model (weighted least squares) and compute its kurtosis maps.

    Runs ``DiffusionKurtosisModel(gtab, fit_method="WLS").fit(data)`` then ``mk()``, ``rk()`` and
    ``kfa`` with dipy's defaults (analytical MK and RK, kurtosis clipped to [-3/7, 10]).

    .. math::

        \\ln S(b, \\mathbf n) = \\ln S_0 - b\\, n_i n_j D_{ij}
            + \\tfrac16 b^2 \\bar D^2 n_i n_j n_k n_l W_{ijkl},
        \\qquad
        \\mathrm{MK} = \\frac{1}{4\\pi}\\oint \\frac{\\bar D^2\\, W(\\mathbf n)}{D(\\mathbf n)^2}\\,
            d\\mathbf n

    (Jensen et al. 2005, Magn Reson Med 53:1432; analytical MK and RK: Tabesh et al. 2011, Magn
    Reson Med 65:823; KFA: Glenn et al. 2015, NMR Biomed 28:448).

    Parameters
    ----------
    data : array_like, shape (N, n)
        Signals of N voxels, n volumes (any positive scale; dipy clips at its minimum signal).
    bvals : array_like, shape (n,)
        b-values in s/mm²; at least three distinct values (b = 0 included).
    bvecs : array_like, shape (n, 3)
        Unit gradient directions (anything for the b = 0 volumes).

    Returns
    -------
    dict
        ``mk``, ``rk``, ``kfa`` (dimensionless), ``md`` (mm²/s), ``fa``: float64 arrays (N,);
        ``seconds``: wall time of the fit and the three kurtosis measures (the gradient table and
        the model, built once per protocol, are outside it; ``md`` and ``fa`` are too).

    Examples
    --------
    Free diffusion has no kurtosis; an equal mixture of free compartments of 0.5e-3 and 1.5e-3
    mm²/s has K = 3 Var(D) / D̄² = 0.75 at b → 0, which a fit up to b = 2000 s/mm² underestimates:

    >>> from dipy.data import get_sphere
    >>> directions = get_sphere(name="repulsion100").vertices[:30]
    >>> b = np.r_[0.0, np.full(30, 1000.0), np.full(30, 2000.0)]
    >>> g = np.r_[np.zeros((1, 3)), directions, directions]
    >>> mixture = 0.5 * np.exp(-b * 0.5e-3) + 0.5 * np.exp(-b * 1.5e-3)
    >>> out = dipy_dki(np.stack([np.exp(-b * 0.8e-3), mixture]), b, g)
    >>> print(np.round(out["md"] * 1e3, 3), np.round(out["mk"], 2) + 0.0)
    [0.8   0.977] [0.   0.61]
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst import dki

    signals = real_finite_array(data, "data")
    if signals.ndim != 2:
        raise InputError("data", f"must have shape (voxels, volumes), got {signals.shape}")
    b, g = _protocol(bvals, bvecs, signals.shape[1])
    if np.unique(np.where(b <= B0_THRESHOLD, 0.0, np.round(b))).size < 3:
        raise InputError("bvals", "DKI needs at least three distinct b-values (b = 0 included)")
    gtab = gradient_table(b, bvecs=g, b0_threshold=B0_THRESHOLD)
    model = dki.DiffusionKurtosisModel(gtab, fit_method="WLS")

    start = time.perf_counter()
    fit = model.fit(signals)
    mk, rk, kfa = fit.mk(), fit.rk(), fit.kfa
    seconds = time.perf_counter() - start

    measures = {"mk": mk, "rk": rk, "kfa": kfa, "md": fit.md, "fa": fit.fa}
    return {**{k: np.asarray(v, dtype=np.float64) for k, v in measures.items()}, "seconds": seconds}


@contextlib.contextmanager
def _amico_session() -> Iterator[None]:
    """Run AMICO quietly; turn its exits into RuntimeError and its warnings into Python warnings.

    AMICO reports an error by printing it and calling ``sys.exit``, so its stdout is captured at
    verbosity 1 (warnings and errors only) to recover the message.
    """
    import amico

    previous = amico.get_verbose()
    amico.set_verbose(1)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    except SystemExit:
        message = _ANSI_ESCAPE.sub("", captured.getvalue()).strip() or "no message"
        raise RuntimeError(f"AMICO failed: {message}") from None
    except Exception as err:
        printed = _ANSI_ESCAPE.sub("", captured.getvalue()).strip()
        raise RuntimeError(
            f"AMICO failed: {type(err).__name__}: {err}" + (f" ({printed})" if printed else "")
        ) from err
    finally:
        amico.set_verbose(previous)
    for line in _ANSI_ESCAPE.sub("", captured.getvalue()).splitlines():
        if line.strip():
            warnings.warn(f"AMICO: {line.strip()}", stacklevel=3)


def _ensure_rotation_matrices() -> float:
    """Compute AMICO's rotation matrices for its default LUT once; seconds spent (0 if cached).

    ``amico.setup()`` computes them for all 22 supported LUT resolutions (about 1 min and 170 MB in
    ``$DIPY_HOME``, default ``~/.dipy``); the default resolution alone takes a fraction of a
    second, and is the only one the kernels use.
    """
    import amico.lut

    cached = Path(amico.lut.dipy_home) / f"AMICO_aux_matrices_lmax={_AMICO_LMAX}_ndirs={_AMICO_NDIRS}.pickle"
    if cached.is_file():
        return 0.0
    start = time.perf_counter()
    amico.lut.precompute_rotation_matrices(_AMICO_LMAX, _AMICO_NDIRS)
    return time.perf_counter() - start


def _write_inputs(
    directory: Path, volume: np.ndarray, mask: np.ndarray, b: np.ndarray, g: np.ndarray
) -> None:
    """``dwi.nii.gz``, ``mask.nii.gz``, FSL ``dwi.bval``/``dwi.bvec`` and AMICO's ``dwi.scheme``."""
    import amico.util
    import nibabel as nib

    affine = np.eye(4)
    with atomic_path(directory / "dwi.nii.gz") as tmp:
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), tmp)
    with atomic_path(directory / "mask.nii.gz") as tmp:
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), tmp)
    write_text(directory / "dwi.bval", " ".join(f"{v:.6f}" for v in b) + "\n")
    write_text(directory / "dwi.bvec", "\n".join(" ".join(f"{v:.8f}" for v in row) for row in g.T) + "\n")
    amico.util.fsl2scheme(
        str(directory / "dwi.bval"), str(directory / "dwi.bvec"), str(directory / "dwi.scheme")
    )


def amico_noddi(
    data: ArrayLike,
    bvals: ArrayLike,
    bvecs: ArrayLike,
    mask: ArrayLike | None = None,
    workdir: str | Path | None = None,
    d_par: float = 1.7e-3,
    d_iso: float = 3.0e-3,
    n_threads: int = 2,
) -> dict[str, np.ndarray | float]:
    """Fit NODDI with AMICO (dmri-amico 2.1.1), as its tutorial does, and return its three maps.

    Writes the data, mask and scheme into ``workdir``, then runs ``Evaluation``, ``load_data``,
    ``set_model("NODDI")`` with the given diffusivities, ``generate_kernels(regenerate=True)``,
    ``load_kernels()``, ``fit()`` and ``save_results()``, and reads back ``fit_NDI``, ``fit_ODI``
    and ``fit_FWF``. AMICO fits the linearised model

    .. math::

        \\frac{S}{S_0} = (1-\\nu_\\text{iso})\\big[\\nu_\\text{ic} E_\\text{ic}(\\kappa)
            + (1-\\nu_\\text{ic}) E_\\text{ec}(\\kappa, \\nu_\\text{ic})\\big]
            + \\nu_\\text{iso}\\, e^{-b d_\\text{iso}},
        \\qquad \\mathrm{ODI} = \\tfrac{2}{\\pi}\\arctan(1/\\kappa),

    with Watson-dispersed sticks of diffusivity :math:`d_\\parallel` and a zeppelin of
    :math:`d_\\perp = d_\\parallel(1-\\nu_\\text{ic})`, on a dictionary of 12 × 12 (κ, ν_ic) atoms
    oriented along the voxel's DTI direction (Zhang et al. 2012, NeuroImage 61:1000; Daducci et
    al. 2015, NeuroImage 105:32). The maps are the atoms' weighted averages: ``icvf`` is
    ν_ic (the neurite fraction of the non-free-water signal), ``isovf`` is ν_iso.

    Parameters
    ----------
    data : array_like, shape (X, Y, Z, n) or (N, n)
        Signals; each voxel is normalised by its mean b = 0 signal.
    bvals : array_like, shape (n,)
        b-values in s/mm²; b ≤ 50 counts as b = 0 and at least one such volume is needed. Each
        distinct b-value is its own shell (AMICO does not round).
    bvecs : array_like, shape (n, 3)
        Unit gradient directions.
    mask : array_like of bool, shape data.shape[:-1], optional
        Voxels to fit (default: all); at least two (AMICO fails on a single voxel).
    workdir : str or Path, optional
        Folder for AMICO's inputs, kernels (``kernels/NODDI``) and outputs (``AMICO/NODDI``);
        a temporary folder, removed afterwards, by default.
    d_par : float
        Intrinsic neurite diffusivity :math:`d_\\parallel` in mm²/s (AMICO's default 1.7e-3).
    d_iso : float
        Free-water diffusivity in mm²/s (AMICO's default 3.0e-3).
    n_threads : int
        Threads of AMICO's voxel loop (its BLAS stays at one thread, AMICO's default).

    Returns
    -------
    dict
        ``odi``, ``icvf``, ``isovf``: float64 arrays of shape ``data.shape[:-1]``, NaN outside
        the mask; ``seconds_kernels``: wall time of ``generate_kernels`` + ``load_kernels``;
        ``seconds_fit``: wall time of ``fit`` (DTI directions and the dictionary fit);
        ``seconds_setup``: time spent computing AMICO's rotation matrices (0 when cached).

    Raises
    ------
    RuntimeError
        If AMICO stops with an error; the message is AMICO's.

    Examples
    --------
    >>> out = amico_noddi(signals, bvals, bvecs)  # doctest: +SKIP
    >>> out["odi"].shape == signals.shape[:-1]  # doctest: +SKIP
    True
    """
    signals = real_finite_array(data, "data")
    if signals.ndim not in (2, 4):
        raise InputError(
            "data", f"must have shape (X, Y, Z, volumes) or (voxels, volumes), got {signals.shape}"
        )
    b, g = _protocol(bvals, bvecs, signals.shape[-1])
    if mask is None:
        inside = np.ones(signals.shape[:-1], dtype=bool)
    else:
        inside = np.asarray(mask)
        if inside.shape != signals.shape[:-1]:
            raise InputError(
                "mask", f"must have shape {signals.shape[:-1]} to match the data, got {inside.shape}"
            )
        if inside.dtype != bool and not np.isin(inside, (0, 1)).all():
            raise InputError("mask", "must be boolean (or 0/1)")
        inside = inside.astype(bool)
    if inside.sum() < 2:
        # amico 2.1.1 squeezes its DTI directions to shape (3,) for a single voxel, then fails.
        raise InputError("mask" if mask is not None else "data", "AMICO needs at least two voxels to fit")
    for name, value in (("d_par", d_par), ("d_iso", d_iso)):
        if not (isinstance(value, (int, float, np.floating)) and 1e-5 <= value <= 1e-2):
            raise InputError(name, f"must be a diffusivity in mm²/s between 1e-5 and 1e-2, got {value!r}")
    if not (isinstance(n_threads, (int, np.integer)) and n_threads >= 1):
        raise InputError("n_threads", f"must be a positive integer, got {n_threads!r}")

    # AMICO reads NIfTI volumes; a voxel list becomes an N×1×1 image.
    volume = signals if signals.ndim == 4 else signals.reshape(-1, 1, 1, signals.shape[-1])
    volume_mask = inside.reshape(volume.shape[:3])
    n_voxels = int(volume_mask.sum())

    with contextlib.ExitStack() as stack:
        if workdir is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="amico-")))
        else:
            directory = Path(workdir)
            directory.mkdir(parents=True, exist_ok=True)
        stack.enter_context(_amico_session())
        import amico
        import nibabel as nib

        seconds_setup = _ensure_rotation_matrices()
        _write_inputs(directory, volume, volume_mask, b, g)
        evaluation = amico.Evaluation(study_path=str(directory), subject=".")
        # AMICO splits the voxels into one chunk per thread and fails on empty chunks.
        evaluation.set_config("nthreads", min(int(n_threads), n_voxels))
        evaluation.set_config("BLAS_nthreads", 1)
        evaluation.load_data("dwi.nii.gz", "dwi.scheme", mask_filename="mask.nii.gz", b0_thr=B0_THRESHOLD)
        evaluation.set_model("NODDI")
        model = evaluation.model
        model.set(
            dPar=float(d_par), dIso=float(d_iso), IC_VFs=model.IC_VFs, IC_ODs=model.IC_ODs, isExvivo=False
        )

        start = time.perf_counter()
        evaluation.generate_kernels(regenerate=True)
        evaluation.load_kernels()
        seconds_kernels = time.perf_counter() - start

        start = time.perf_counter()
        evaluation.fit()
        seconds_fit = time.perf_counter() - start

        evaluation.save_results()
        results = directory / "AMICO" / "NODDI"
        maps = {}
        for amico_name, name in _AMICO_NODDI_MAPS.items():
            values = np.asarray(nib.load(results / f"fit_{amico_name}.nii.gz").get_fdata(), dtype=np.float64)
            maps[name] = np.where(volume_mask, values, np.nan).reshape(signals.shape[:-1])

    return {
        **maps,
        "seconds_fit": seconds_fit,
        "seconds_kernels": seconds_kernels,
        "seconds_setup": seconds_setup,
    }


# ----------------------------------------------------------------------------------------------
# Smoke run: simulated NODDI and multi-tensor voxels with known truth.


def _fibonacci_sphere(n: int) -> np.ndarray:
    """n near-uniform unit vectors on the sphere (golden-angle spiral)."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = np.pi * (1.0 + 5**0.5) * i
    r = np.sqrt(1.0 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _half_sphere(n: int) -> np.ndarray:
    """n directions spread over the half sphere z > 0 (antipodal directions are equivalent)."""
    points = _fibonacci_sphere(2 * n)
    return points[points[:, 2] > 0]


def _protocol_table(shells: list[tuple[float, int]], n_b0: int) -> tuple[np.ndarray, np.ndarray]:
    bvals = [np.zeros(n_b0)] + [np.full(count, b) for b, count in shells]
    bvecs = [np.zeros((n_b0, 3))] + [_half_sphere(count) for _, count in shells]
    return np.concatenate(bvals), np.concatenate(bvecs)


def _random_directions(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _rician(rng: np.random.Generator, signal: np.ndarray, snr: float) -> np.ndarray:
    sigma = 1.0 / snr
    return np.hypot(
        signal + sigma * rng.standard_normal(signal.shape), sigma * rng.standard_normal(signal.shape)
    )


def _simulate_noddi(
    n_voxels: int,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    snr: float,
    seed: int,
    d_par: float = 1.7e-3,
    d_iso: float = 3.0e-3,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """NODDI signals by quadrature of the Watson integral on a 6,000-point spherical grid.

    Independent of AMICO's Legendre-series stick and closed-form zeppelin: the stick is averaged
    numerically, and the zeppelin uses the numerically averaged tensor d_perp I + (d_par - d_perp)
    <n n^T>_Watson.
    """
    rng = np.random.default_rng(seed)
    truth = {
        "icvf": rng.uniform(0.2, 0.8, n_voxels),
        "odi": rng.uniform(0.05, 0.6, n_voxels),
        "isovf": rng.uniform(0.0, 0.3, n_voxels),
    }
    mu = _random_directions(rng, n_voxels)
    kappa = 1.0 / np.tan(np.pi / 2 * truth["odi"])
    grid = _fibonacci_sphere(6000)
    # Subtracting kappa keeps the exponent ≤ 0 (kappa reaches 12.7).
    weights = np.exp(kappa[:, None] * ((mu @ grid.T) ** 2 - 1.0))
    weights /= weights.sum(axis=1, keepdims=True)
    stick = weights @ np.exp(-bvals[None, :] * d_par * (grid @ bvecs.T) ** 2)
    scatter = np.einsum("vm,mi,mj->vij", weights, grid, grid)
    d_perp = d_par * (1.0 - truth["icvf"])
    tensor = d_perp[:, None, None] * np.eye(3) + (d_par - d_perp)[:, None, None] * scatter
    zeppelin = np.exp(-bvals * np.einsum("ni,vij,nj->vn", bvecs, tensor, bvecs))
    tissue = truth["icvf"][:, None] * stick + (1.0 - truth["icvf"][:, None]) * zeppelin
    signal = (1.0 - truth["isovf"][:, None]) * tissue + truth["isovf"][:, None] * np.exp(-bvals * d_iso)
    return _rician(rng, signal, snr), truth


def _check_watson_quadrature() -> float:
    """Largest error of the grid quadrature against the closed-form isotropic stick average."""
    grid = _fibonacci_sphere(6000)
    bd = np.array([0.5, 1.2, 4.85])  # b·d_par at b = 300, 711, 2855 s/mm²
    numeric = np.exp(-bd[:, None] * grid[:, 2] ** 2).mean(axis=1)
    from scipy.special import erf

    exact = np.sqrt(np.pi) / 2 * erf(np.sqrt(bd)) / np.sqrt(bd)
    return float(np.abs(numeric - exact).max())


def _simulate_multi_tensor(
    n_voxels: int, bvals: np.ndarray, bvecs: np.ndarray, snr: float | None, seed: int, cumulant: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Two crossing fibres, each an axon (stick-like) and an extra-axonal tensor (dipy's DKI example).

    Ground truth is the cumulant expansion of the Gaussian mixture: D = Σ f_c D_c and
    K(n) = 3 Var_c[n^T D_c n] / (n^T D n)^2, averaged over a spherical grid (MK) and over the
    circle perpendicular to D's main eigenvector (RK). With ``cumulant`` the signal is that
    expansion itself, ln S = -b Mean_c[n^T D_c n] + b^2 Var_c[n^T D_c n] / 2, which DKI represents
    exactly.
    """
    rng = np.random.default_rng(seed)
    axon, extra = np.array([0.99e-3, 0.0, 0.0]), np.array([2.26e-3, 0.87e-3, 0.87e-3])
    fibres = [_random_directions(rng, n_voxels), _random_directions(rng, n_voxels)]
    fibre_weight = rng.uniform(0.5, 1.0, n_voxels)
    axon_fraction = rng.uniform(0.3, 0.6, n_voxels)
    tensors, fractions = [], []
    for direction, w in zip(fibres, (fibre_weight, 1.0 - fibre_weight)):
        outer = direction[:, :, None] * direction[:, None, :]
        for evals, f in ((axon, axon_fraction), (extra, 1.0 - axon_fraction)):
            # Axially symmetric tensor: λ⊥ I + (λ∥ − λ⊥) u uᵀ.
            tensors.append(evals[1] * np.eye(3) + (evals[0] - evals[1]) * outer)
            fractions.append(w * f)
    tensors, fractions = np.stack(tensors, 1), np.stack(fractions, 1)  # (N, C, 3, 3), (N, C)
    adc = np.einsum("ni,vcij,nj->vcn", bvecs, tensors, bvecs)
    if cumulant:
        mean_adc = np.einsum("vc,vcn->vn", fractions, adc)
        var_adc = np.einsum("vc,vcn->vn", fractions, adc**2) - mean_adc**2
        signal = np.exp(-bvals * mean_adc + bvals**2 * var_adc / 2)
    else:
        signal = np.einsum("vc,vcn->vn", fractions, np.exp(-bvals * adc))

    mean_tensor = np.einsum("vc,vcij->vij", fractions, tensors)
    evals, evecs = np.linalg.eigh(mean_tensor)

    def kurtosis(directions: np.ndarray) -> np.ndarray:
        """K along directions shared by all voxels (M, 3) or per voxel (V, M, 3); shape (V, M)."""
        per_voxel = "v" if directions.ndim == 3 else ""
        d_c = np.einsum(f"{per_voxel}mi,vcij,{per_voxel}mj->vcm", directions, tensors, directions)
        mean = np.einsum("vc,vcm->vm", fractions, d_c)
        var = np.einsum("vc,vcm->vm", fractions, d_c**2) - mean**2
        return 3.0 * var / mean**2

    sphere = _fibonacci_sphere(3000)
    angle = np.linspace(0.0, 2 * np.pi, 180, endpoint=False)
    e2, e3 = evecs[:, :, 1], evecs[:, :, 0]
    circle = np.cos(angle)[None, :, None] * e2[:, None, :] + np.sin(angle)[None, :, None] * e3[:, None, :]
    md = evals.mean(axis=1)
    fa = np.sqrt(1.5 * ((evals - md[:, None]) ** 2).sum(axis=1) / (evals**2).sum(axis=1))
    truth = {"mk": kurtosis(sphere).mean(axis=1), "rk": kurtosis(circle).mean(axis=1), "md": md, "fa": fa}
    return (signal if snr is None else _rician(rng, signal, snr)), truth


def _agreement(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Pearson correlation, RMSE) over the voxels where the estimate is finite."""
    ok = np.isfinite(estimate)
    return float(np.corrcoef(estimate[ok], truth[ok])[0, 1]), float(
        np.sqrt(np.mean((estimate[ok] - truth[ok]) ** 2))
    )


def _smoke_run(n_voxels: int = 2000) -> None:
    print(f"Watson quadrature, largest error against the closed form: {_check_watson_quadrature():.1e}")

    bvals, bvecs = _protocol_table([(711.0, 30), (2855.0, 60)], n_b0=9)
    signals, truth = _simulate_noddi(n_voxels, bvals, bvecs, snr=30.0, seed=1)
    with tempfile.TemporaryDirectory(prefix="amico-smoke-") as workdir:
        out = amico_noddi(signals, bvals, bvecs, workdir=Path(workdir))
    print(f"\nAMICO NODDI, {n_voxels} voxels, {bvals.size} volumes, SNR 30:")
    print(
        f"  rotation matrices {out['seconds_setup']:.2f} s, kernels {out['seconds_kernels']:.2f} s, "
        f"fit {out['seconds_fit']:.2f} s = {1e3 * out['seconds_fit'] / n_voxels:.2f} ms/voxel "
        f"({1e3 * out['seconds_fit'] / n_voxels:.2f} s per 1000 voxels)"
    )
    names = ("icvf", "odi", "isovf")
    print("  correlation of AMICO's maps (rows) with the truth (columns): " + "  ".join(names))
    for row in names:
        corr = [_agreement(out[row], truth[col])[0] for col in names]
        print(f"    {row:6s}" + "".join(f"{c:8.3f}" for c in corr))
    for name in names:
        r, rmse = _agreement(out[name], truth[name])
        bias = float(np.nanmean(out[name] - truth[name]))
        print(f"  {name:6s} r = {r:.3f}, RMSE = {rmse:.3f}, bias = {bias:+.3f}")

    bvals, bvecs = _protocol_table([(750.0, 25), (1070.0, 40), (3000.0, 75)], n_b0=8)
    cases = [
        ("cumulant signal, noise-free", None, True),
        ("mixture signal, noise-free", None, False),
        ("mixture signal, SNR 30", 30.0, False),
    ]
    for label, snr, cumulant in cases:
        signals, truth = _simulate_multi_tensor(n_voxels, bvals, bvecs, snr=snr, seed=2, cumulant=cumulant)
        out = dipy_dki(signals, bvals, bvecs)
        print(
            f"\ndipy DKI (WLS), {n_voxels} voxels, {bvals.size} volumes, {label}: "
            f"{out['seconds']:.2f} s = {n_voxels / out['seconds']:.0f} voxels/s"
        )
        for name in ("mk", "rk", "md", "fa"):
            r, rmse = _agreement(out[name], truth[name])
            scale = 1e3 if name == "md" else 1.0
            print(
                f"  {name:3s} r = {r:.3f}, RMSE = {scale * rmse:.4f}{' µm²/ms' if name == 'md' else ''}, "
                f"mean estimate {scale * np.nanmean(out[name]):.3f} vs truth {scale * truth[name].mean():.3f}"
            )
        print(f"  kfa mean {np.nanmean(out['kfa']):.3f}")


if __name__ == "__main__":
    _smoke_run()
