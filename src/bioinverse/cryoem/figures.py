"""Figures of cryo-EM results: FSC curves, angular errors, central slices of maps (PNG, written atomically).

Each function draws on a :class:`matplotlib.figure.Figure` of its own (no pyplot state, no backend
switch), renders it with :func:`bioinverse.report.figure_to_png` and writes the bytes with
:func:`bioinverse.io.write_bytes`, so a figure appears complete or not at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bioinverse.errors import InputError

__all__ = ["angular_error_figure", "fsc_figure", "slices_figure"]

# Resolutions (Å) offered as ticks of the secondary axis; those inside the plotted range are used.
_ANGSTROM_TICKS = (100.0, 50.0, 30.0, 20.0, 15.0, 10.0, 8.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.2, 1.0)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    from bioinverse.io import write_bytes
    from bioinverse.report import figure_to_png

    return write_bytes(path, figure_to_png(fig))


def _named(items, what: str, argument: str) -> dict:
    if not isinstance(items, dict) or not items:
        raise InputError(argument, f"must be a non-empty dict of {what} by name")
    return items


def fsc_figure(curves: dict, path: str | os.PathLike, thresholds: tuple[float, ...] = (0.143, 0.5)) -> Path:
    """Overlay of FSC curves against spatial frequency, with a resolution (Å) axis on top.

    Each curve's legend entry gives its resolution at every threshold, from the spatial frequency
    where the curve first falls below it (:meth:`bioinverse.fourier.FSCCurve.resolution`):

    .. math:: d_t = 1 / k_t, \\qquad \\mathrm{FSC}(k_t) = t,

    with t = 0.143 for two independent half maps (Rosenthal & Henderson 2003, J. Mol. Biol. 333, 721)
    and 0.5 for a map against a reference (a ground truth or another method's map).

    Parameters
    ----------
    curves : dict of str to FSCCurve
        Legend label → curve; curves of different boxes and pixel sizes share the 1/Å axis.
    path : str or os.PathLike
        Destination PNG.
    thresholds : tuple of float
        Horizontal lines drawn, and the resolutions quoted in the legend.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    InputError
        ``curves`` empty or holding something other than FSCCurves.

    Examples
    --------
    >>> import tempfile
    >>> from bioinverse.fourier import FSCCurve
    >>> curve = FSCCurve([0.0, 0.1, 0.2, 0.3], [1.0, 0.9, 0.4, 0.05], [1, 26, 90, 200], 1.5)
    >>> out = fsc_figure({"ours": curve}, Path(tempfile.mkdtemp()) / "fsc.png")
    >>> out.read_bytes()[:4]
    b'\\x89PNG'
    """
    from bioinverse.fourier import FSCCurve

    curves = _named(curves, "FSCCurves", "curves")
    for name, curve in curves.items():
        if not isinstance(curve, FSCCurve):
            raise InputError("curves", f"entry {name!r} is a {type(curve).__name__}, not an FSCCurve")
    thresholds = tuple(float(t) for t in thresholds)
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        label = str(name)
        if thresholds:
            label += " (" + ", ".join(f"{curve.resolution(t):.2f} Å at {t:g}" for t in thresholds) + ")"
        ax.plot(curve.frequency, curve.values, lw=1.6, label=label)
    for t in thresholds:
        ax.axhline(t, color="grey", ls=":", lw=1)
        ax.annotate(f"{t:g}", (1.0, t), xycoords=("axes fraction", "data"), xytext=(2, 0),
                    textcoords="offset points", va="center", fontsize=8, color="grey")
    nyquist = max(float(curve.frequency.max()) for curve in curves.values())
    ax.set(xlabel="spatial frequency (1/Å)", ylabel="FSC", ylim=(-0.1, 1.05))
    if nyquist > 0:
        ax.set_xlim(0.0, nyquist)
    ax.axhline(0.0, color="black", lw=0.5)
    ax.legend(loc="best", fontsize=8)
    # The top axis shares the frequency scale and labels chosen frequencies by their resolution: an axis in
    # 1/frequency would put the zero frequency at infinity.
    top = ax.secondary_xaxis("top")
    ticks = []
    for d in sorted(_ANGSTROM_TICKS):  # from Nyquist down, dropping ticks too close to the last one kept
        if 1.0 / d <= nyquist * (1 + 1e-9) and (not ticks or 1.0 / ticks[-1] - 1.0 / d >= 0.06 * nyquist):
            ticks.append(d)
    top.set_xticks([1.0 / d for d in ticks], [f"{d:g}" for d in ticks])
    top.set_xlabel("resolution (Å)")
    return _save(fig, path)


def angular_error_figure(errors: dict, path: str | os.PathLike, clip: float = 30.0) -> Path:
    """Histograms of angular errors in degrees, errors beyond ``clip`` gathered in the last bin.

    The angular error of a particle is the angle of the rotation between its estimated and its true
    pose, :math:`\\theta = \\arccos\\big((\\operatorname{tr}(R_{\\mathrm{est}}^T R_{\\mathrm{true}}) - 1) / 2\\big)`
    (:func:`bioinverse.cryoem.rotations.angular_distance`). The legend gives each set's median and the
    fraction beyond ``clip``; a dashed line marks each median.

    Parameters
    ----------
    errors : dict of str to array_like
        Label → errors (n,) in degrees, 0 … 180.
    path : str or os.PathLike
        Destination PNG.
    clip : float
        Degrees; the histogram's range is [0, clip].

    Returns
    -------
    pathlib.Path

    Raises
    ------
    InputError
        ``errors`` empty; a set that is empty, not 1-D, negative, NaN or Inf; ``clip`` ≤ 0.

    Examples
    --------
    >>> import tempfile
    >>> rng = np.random.default_rng(0)
    >>> out = angular_error_figure({"ours": rng.gamma(2.0, 2.0, 500)}, Path(tempfile.mkdtemp()) / "err.png")
    >>> out.read_bytes()[:4]
    b'\\x89PNG'
    """
    from bioinverse._checks import real_finite_array

    errors = _named(errors, "error arrays", "errors")
    if not clip > 0:
        raise InputError("clip", f"must be positive, got {clip}")
    sets = {}
    for name, values in errors.items():
        values = real_finite_array(values, f"errors[{name!r}]")
        if values.ndim != 1 or values.size == 0 or (values < 0).any():
            raise InputError("errors", f"entry {name!r} must be a non-empty 1-D array of angles ≥ 0 degrees")
        sets[str(name)] = values
    bins = np.linspace(0.0, clip, 61)
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    for k, (name, values) in enumerate(sets.items()):
        colour = f"C{k % 10}"
        median = float(np.median(values))
        beyond = float(np.mean(values > clip))
        label = f"{name}: median {median:.2f}°"
        if beyond > 0:
            label += f", {100 * beyond:.1f} % > {clip:g}°"
        ax.hist(np.minimum(values, clip), bins=bins, histtype="step", lw=1.5, color=colour, label=label)
        ax.axvline(min(median, clip), color=colour, ls="--", lw=1)
    ax.set(xlabel=f"angular error (degrees; > {clip:g}° in the last bin)", ylabel="particles", xlim=(0.0, clip))
    ax.legend(fontsize=8)
    return _save(fig, path)


def _display(volume: np.ndarray) -> np.ndarray:
    """Map standardised to zero mean and unit standard deviation (a flat map stays flat)."""
    volume = volume - volume.mean()
    spread = volume.std()
    return volume / spread if spread > 0 else volume


def slices_figure(maps: dict, path: str | os.PathLike) -> Path:
    """Central slices of maps side by side: one column per map, rows xy, xz and yz.

    Maps are indexed [z, y, x] with the origin at index N // 2 on every axis; the slices are
    ``map[N//2]`` (xy), ``map[:, N//2]`` (xz) and ``map[:, :, N//2]`` (yz), drawn with the first named
    axis horizontal and the second increasing upwards. Each map is standardised,
    :math:`(\\rho - \\bar\\rho) / \\sigma_\\rho`, and drawn in grey from its own 0.5th to 99.9th percentile
    over the three slices, so maps of different scales (a ground truth, a refinement, another program's
    map) compare by shape.

    Parameters
    ----------
    maps : dict of str to ndarray (N, N, N)
        Title → map; boxes may differ between maps.
    path : str or os.PathLike
        Destination PNG.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    InputError
        ``maps`` empty; a map that is not a finite cubic 3-D array.

    Examples
    --------
    >>> import tempfile
    >>> blob = np.zeros((16, 16, 16)); blob[6:10, 7:9, 5:11] = 1.0
    >>> out = slices_figure({"truth": blob, "ours": blob + 0.1}, Path(tempfile.mkdtemp()) / "slices.png")
    >>> out.read_bytes()[:4]
    b'\\x89PNG'
    """
    from bioinverse._checks import real_finite_array

    maps = _named(maps, "3-D maps", "maps")
    volumes = {}
    for name, volume in maps.items():
        volume = real_finite_array(volume, f"maps[{name!r}]")
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise InputError("maps", f"entry {name!r} must be a cubic 3-D map, got shape {volume.shape}")
        volumes[str(name)] = _display(volume)
    planes = (("xy", lambda v, c: v[c], "x", "y"), ("xz", lambda v, c: v[:, c], "x", "z"),
              ("yz", lambda v, c: v[:, :, c], "y", "z"))
    columns = len(volumes)
    fig = _figure(2.2 * columns + 0.4, 6.8)
    axes = fig.subplots(3, columns, squeeze=False)
    for j, (name, volume) in enumerate(volumes.items()):
        centre = volume.shape[0] // 2
        slices = [take(volume, centre) for _, take, _, _ in planes]
        low, high = np.percentile(np.concatenate([s.ravel() for s in slices]), [0.5, 99.9])
        if high <= low:
            low, high = low - 1.0, high + 1.0
        for i, ((plane, _, horizontal, vertical), image) in enumerate(zip(planes, slices)):
            ax = axes[i, j]
            ax.imshow(image, cmap="gray", origin="lower", vmin=low, vmax=high, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{plane} ({vertical} ↑, {horizontal} →)", fontsize=8)
    return _save(fig, path)
