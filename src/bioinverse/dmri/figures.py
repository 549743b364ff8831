"""Figures of the dMRI comparisons: maps side by side with the truth, and RMSE against scan length.

Shared by the showcase demo and the ``dmri_qspace`` benchmark; each returns a matplotlib figure
(render it with :func:`bioinverse.report.figure_to_png`).

The figures of the microstructure comparison (``dmri_fingerprint``) are written straight to PNG
files, atomically: MAE against the true volume fraction (:func:`mae_vs_nu_figure`) and t-SNE maps
of network activations (:func:`tsne_figure`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bioinverse.dmri.phantom import Phantom

__all__ = ["mae_vs_nu_figure", "maps_figure", "rmse_curve_figure", "tsne_figure"]

# Line styles of the estimators, in the order they are given.
_STYLES = (("o-", "tab:red"), ("s-", "tab:blue"), ("^-", "tab:green"))


def maps_figure(phantom: Phantom, estimates: Mapping[str, Mapping[str, np.ndarray]], names: Sequence[str]):
    """One row per measure: the phantom's truth, then each estimate, on the middle axial slice.

    Parameters
    ----------
    phantom : Phantom
        Supplies the ground truth, the mask and the grid.
    estimates : mapping of column label to {measure: values}
        Values of shape (N,) at the phantom's mask voxels (as from ``phantom.voxels()``).
    names : sequence of str
        Measures, one row each; grey scale from 0 to the 99th percentile of the truth.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = phantom.mask.shape[2] // 2
    columns = [("truth", {m: phantom.truth(m) for m in names}), *estimates.items()]
    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.6 * len(columns), 2.5 * len(names)),
                             squeeze=False)
    for row, m in enumerate(names):
        vmax = float(np.percentile(phantom.truth(m), 99))
        for col, (label, values) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(phantom.unmask(values[m])[:, :, z].T, origin="lower", cmap="gray", vmin=0, vmax=vmax)
            ax.set_title(f"{m.upper()}: {label}", fontsize=9)
            ax.set_axis_off()
    fig.tight_layout()
    return fig


def rmse_curve_figure(n_dwis: Sequence[int], rmse: Mapping[str, Mapping[str, Sequence[float]]],
                      names: Sequence[str], title: str | None = None):
    """RMSE against the number of DWIs, one panel per measure, one line per estimator.

    Parameters
    ----------
    n_dwis : sequence of int
        Scan lengths (x axis, log scale, labelled exactly).
    rmse : mapping of estimator label to {measure: RMSE per scan length}
        NaN where an estimator cannot run (e.g. a DKI fit on fewer than 22 volumes).
    names : sequence of str
        Measures, one panel each.
    title : str, optional
        Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names), 3.4), squeeze=False)
    for ax, m in zip(axes[0], names):
        for (label, values), (marker, color) in zip(rmse.items(), _STYLES):
            ax.plot(n_dwis, values[m], marker, color=color, label=label)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(list(n_dwis), [str(n) for n in n_dwis])
        ax.set(xlabel="number of DWIs", ylabel=f"RMSE {m.upper()} vs truth", title=m.upper())
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Microstructure comparison (two crossing populations): the seed's Fig. 3 and Fig. 4
# --------------------------------------------------------------------------------------------

# Colours of the estimators of the microstructure comparison (the seed's Fig. 3: fingerprinting
# blue, hybrid green); other names take the next free colour of the default cycle.
_METHOD_COLOURS = {"fp": "tab:blue", "fingerprinting": "tab:blue", "hybrid": "tab:green",
                   "learned": "tab:red", "fully learned": "tab:red"}
_ORIENTATION_STYLES = {"est": "-", "none": "-", "true": "--"}
_MAE_ROWS = (("nu", "ν"), ("radius", "r (µm)"), ("density", "f"))


def _microstructure_array(value, name: str) -> np.ndarray:
    """A Microstructure (anything with ``as_array``) or an array as finite float64 (V, 6)."""
    from bioinverse._checks import real_finite_array
    from bioinverse.errors import InputError

    a = real_finite_array(value.as_array() if hasattr(value, "as_array") else value, name)
    if a.ndim != 2 or a.shape[1] != 6:
        raise InputError(name, f"must be a Microstructure or an array (V, 6) [nu1, r1, f1, nu2, r2, f2], "
                               f"got shape {a.shape}")
    return a


def _binned_mae(truth: np.ndarray, estimate: np.ndarray, edges: np.ndarray) -> dict[str, np.ndarray]:
    """MAE of ν, r and f in bins of the true ν, both populations pooled; NaN in empty bins."""
    true_nu = truth[:, [0, 3]].ravel()
    which = np.digitize(true_nu, edges[1:-1])  # values on the outer edges fall in the end bins
    inside = (true_nu >= edges[0]) & (true_nu <= edges[-1])
    counts = np.bincount(which[inside], minlength=edges.size - 1).astype(np.float64)
    result = {}
    for column, (name, _) in enumerate(_MAE_ROWS):
        error = np.abs(estimate[:, [column, column + 3]] - truth[:, [column, column + 3]]).ravel()
        sums = np.bincount(which[inside], weights=error[inside], minlength=edges.size - 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            result[name] = np.where(counts > 0, sums / np.maximum(counts, 1.0), np.nan)
    return result


def mae_vs_nu_figure(results, path, *, n_bins: int = 8, nu_range: tuple[float, float] | None = None,
                     title: str | None = None):
    r"""MAE of ν, r and f against the true volume fraction ν, per method and SNR (the seed's Fig. 3).

    Both populations of every voxel are pooled: population k contributes the point
    :math:`(\nu_k, |\hat\omega_k - \omega_k|)` for ω ∈ {ν, r, f}; the MAE is averaged in ``n_bins``
    equal bins of the true ν,

    .. math::

        \mathrm{MAE}_b(\omega) = \frac{1}{|B_b|} \sum_{(v,k) \in B_b} |\hat\omega_{vk} - \omega_{vk}|,
        \qquad B_b = \{(v,k) : \nu_{vk} \in [e_b, e_{b+1})\}.

    Rows: ν, r, f. Columns: SNR levels (ascending). One line per (method, orientations): a colour
    per method (fingerprinting blue, hybrid green, learned red, as in Rensonnet et al., ICML IMLH
    workshop 2021, Fig. 3), solid for estimated orientations, dashed for true orientations, solid
    for methods that use none. Empty bins leave gaps.

    Parameters
    ----------
    results : mapping of (method, orientations, snr) to (truth, estimate)
        ``method`` a label (``"fp"``, ``"hybrid"``, ``"learned"``, …), ``orientations`` one of
        ``"est"``, ``"true"``, ``"none"``, ``snr`` a positive number (``inf``: noise-free);
        ``truth`` and ``estimate`` are :class:`~bioinverse.dmri.crossing.Microstructure` or arrays
        (V, 6) [ν₁, r₁, f₁, ν₂, r₂, f₂] with matching populations (for an estimator that sorts its
        populations by ν, pass the truth sorted the same way).
    path : str or os.PathLike
        PNG file, written atomically.
    n_bins : int, default 8
        Number of bins of the true ν.
    nu_range : (float, float), optional
        Range of the bins; default the smallest and largest true ν.
    title : str, optional
        Figure title.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    InputError
        Empty ``results``, a malformed key, shapes that differ between truth and estimate,
        NaN/Inf, or a bad ``n_bins``/``nu_range``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> rng = np.random.default_rng(0)
    >>> truth = np.column_stack([rng.uniform(0.1, 0.9, 200), rng.uniform(0.25, 2.23, 200),
    ...                          rng.uniform(0.1, 0.76, 200)]).repeat(2, axis=1)
    >>> truth[:, 3] = 1 - truth[:, 0]
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "fig3.png"
    >>> runs = {("fp", "est", 50): (truth, truth + 0.05), ("fp", "true", 50): (truth, truth + 0.02)}
    >>> mae_vs_nu_figure(runs, out, n_bins=4).stat().st_size > 0
    True
    """
    import math
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from bioinverse.errors import InputError
    from bioinverse.io import write_bytes
    from bioinverse.report import figure_to_png

    if not isinstance(results, Mapping) or not results:
        raise InputError("results", "must be a non-empty mapping (method, orientations, snr) -> (truth, estimate)")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InputError("n_bins", f"must be a positive integer, got {n_bins!r}")
    curves = []
    for key, value in results.items():
        if not (isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], str)):
            raise InputError("results", f"keys must be (method, orientations, snr) tuples, got {key!r}")
        method, orientation, snr = key
        if orientation not in _ORIENTATION_STYLES:
            raise InputError("results", f"orientations of {key!r} must be one of "
                                        f"{', '.join(map(repr, _ORIENTATION_STYLES))}")
        try:
            snr = float(snr)
        except (TypeError, ValueError):
            raise InputError("results", f"the SNR of {key!r} is not a number") from None
        if not snr > 0:
            raise InputError("results", f"the SNR of {key!r} must be positive")
        if not (isinstance(value, tuple) and len(value) == 2):
            raise InputError(f"results[{key!r}]", "must be a pair (truth, estimate)")
        truth = _microstructure_array(value[0], f"results[{key!r}] truth")
        estimate = _microstructure_array(value[1], f"results[{key!r}] estimate")
        if truth.shape != estimate.shape:
            raise InputError(f"results[{key!r}]", f"truth has shape {truth.shape} but the estimate has "
                                                  f"{estimate.shape}")
        curves.append((method, orientation, snr, truth, estimate))

    all_nu = np.concatenate([c[3][:, [0, 3]].ravel() for c in curves])
    if nu_range is None:
        low, high = float(all_nu.min()), float(all_nu.max())
        if high <= low:
            low, high = low - 0.05, high + 0.05
    else:
        try:
            low, high = (float(v) for v in nu_range)
        except (TypeError, ValueError):
            raise InputError("nu_range", f"must be a pair (low, high), got {nu_range!r}") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise InputError("nu_range", f"must satisfy low < high (finite), got {nu_range!r}")
    edges = np.linspace(low, high, int(n_bins) + 1)
    centres = 0.5 * (edges[:-1] + edges[1:])

    snrs = sorted({c[2] for c in curves})
    methods = list(dict.fromkeys(c[0] for c in curves))
    spare = iter(c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]
                 if c not in ("#1f77b4", "#2ca02c", "#d62728"))
    colours = {m: _METHOD_COLOURS.get(m.lower()) or next(spare, "black") for m in methods}

    fig, axes = plt.subplots(len(_MAE_ROWS), len(snrs), figsize=(3.4 * len(snrs), 2.7 * len(_MAE_ROWS)),
                             squeeze=False, sharex=True)
    for method, orientation, snr, truth, estimate in curves:
        col = snrs.index(snr)
        mae = _binned_mae(truth, estimate, edges)
        for row, (name, _) in enumerate(_MAE_ROWS):
            axes[row, col].plot(centres, mae[name], _ORIENTATION_STYLES[orientation], marker=".",
                                color=colours[method])
    for col, snr in enumerate(snrs):
        axes[0, col].set_title("noise-free" if math.isinf(snr) else f"SNR {snr:g}")
        axes[-1, col].set_xlabel("true ν")
        for row, (_, label) in enumerate(_MAE_ROWS):
            axes[row, col].set_ylim(bottom=0)
            axes[row, col].grid(alpha=0.3)
            if col == 0:
                axes[row, col].set_ylabel(f"MAE {label}")
    handles = [Line2D([], [], color=colours[m], label=m) for m in methods]
    used = {c[1] for c in curves}
    handles += [Line2D([], [], color="grey", linestyle=_ORIENTATION_STYLES[o], label=label)
                for o, label in (("est", "estimated u"), ("true", "true u")) if o in used]
    axes[0, 0].legend(handles=handles, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return write_bytes(Path(path), figure_to_png(fig))


def _one_openmp_thread():
    """Limit OpenMP to one thread, scikit-learn's runtime included (imported first: threadpoolctl
    only reaches the libraries already loaded)."""
    import contextlib

    import sklearn.manifold  # noqa: F401

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with scikit-learn; without it, keep the defaults
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="openmp")


def _embed(x: np.ndarray, perplexity: float, pca_components: int | None, max_iter: int,
           random_state: int) -> np.ndarray | None:
    """2-D t-SNE embedding of the rows of ``x``; None when all rows are equal (a dead layer)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if np.ptp(x, axis=0).max() == 0:
        return None
    if pca_components is not None and x.shape[1] > pca_components and x.shape[0] > pca_components:
        x = PCA(n_components=pca_components, random_state=random_state).fit_transform(x)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=max_iter,
                random_state=random_state).fit_transform(x)


def tsne_figure(activations, colours, path, *, perplexity: float = 30.0, random_state: int = 0,
                max_points: int | None = 2000, pca_components: int | None = 50, max_iter: int = 500,
                title: str | None = None):
    r"""t-SNE maps of network activations, coloured by tissue parameters (the seed's Fig. 4).

    Every activation matrix (one row per voxel) is embedded in the plane by t-SNE (van der Maaten &
    Hinton, JMLR 9:2579, 2008; :class:`sklearn.manifold.TSNE`, PCA initialisation, fixed
    ``random_state``), which keeps points that are close in activation space close in the plane by
    matching the neighbour distributions

    .. math::

        p_{j|i} \propto e^{-\lVert x_i - x_j\rVert^2 / 2\sigma_i^2},\qquad
        q_{ij} \propto (1 + \lVert y_i - y_j\rVert^2)^{-1},\qquad
        \min_y \mathrm{KL}(P \,\Vert\, Q).

    One column per (network, layer), one row per colouring: a layer has learned a parameter when
    its map is ordered by that colour (Rensonnet, Adam & Macq, ICML IMLH workshop 2021, §4.3).

    Parameters
    ----------
    activations : mapping of str to array_like (n, d)
        Panel label (e.g. ``"hybrid · branch 1"``, ``"learned · layer 4"``) to the activations of
        that layer, the same n voxels in the same order everywhere.
    colours : mapping of str to array_like (n,)
        Colouring label (e.g. ``"r"``, ``"f"``, ``"ν"``) to one value per voxel.
    path : str or os.PathLike
        PNG file, written atomically.
    perplexity : float, default 30
        t-SNE perplexity (lowered to (n − 1)/3 for small n).
    random_state : int, default 0
        Seed of t-SNE and of the subsample.
    max_points : int or None, default 2000
        At most this many voxels (a seeded random subset, the same for every panel) are embedded;
        ``None`` embeds all (t-SNE costs O(n log n) per iteration).
    pca_components : int or None, default 50
        Activations wider than this are first projected on their leading principal components
        (the usual preprocessing of t-SNE; it speeds up the neighbour search); ``None`` skips it.
    max_iter : int, default 500
        t-SNE iterations, at least 250 (the first 250 with early exaggeration); 500 settle maps
        of a few thousand points at half the cost of scikit-learn's default of 1000.
    title : str, optional
        Figure title.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    InputError
        Empty mappings, arrays of the wrong shape or size, NaN/Inf, or bad settings.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> rng = np.random.default_rng(0)
    >>> r = rng.uniform(0.25, 2.23, 60)
    >>> acts = {"net · layer 1": np.column_stack([r, rng.normal(size=60)])}
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "fig4.png"
    >>> tsne_figure(acts, {"r": r}, out).stat().st_size > 0
    True
    """
    import math
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bioinverse._checks import real_finite_array
    from bioinverse.errors import InputError
    from bioinverse.io import write_bytes
    from bioinverse.report import figure_to_png

    if not isinstance(activations, Mapping) or not activations:
        raise InputError("activations", "must be a non-empty mapping label -> array (n, d)")
    if not isinstance(colours, Mapping) or not colours:
        raise InputError("colours", "must be a non-empty mapping label -> values (n,)")
    try:
        perplexity = float(perplexity)
    except (TypeError, ValueError):
        raise InputError("perplexity", f"must be a positive number, got {perplexity!r}") from None
    if not (math.isfinite(perplexity) and perplexity > 0):
        raise InputError("perplexity", f"must be a positive number, got {perplexity!r}")
    for name, value, low in (("max_points", max_points, 4), ("pca_components", pca_components, 2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low):
            raise InputError(name, f"must be an integer >= {low} or None, got {value!r}")
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)) or random_state < 0:
        raise InputError("random_state", f"must be a non-negative integer, got {random_state!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 250:
        raise InputError("max_iter", f"must be an integer >= 250, got {max_iter!r}")

    panels = {}
    n = None
    for label, value in activations.items():
        a = real_finite_array(value, f"activations[{label!r}]")
        if a.ndim != 2:
            raise InputError(f"activations[{label!r}]", f"must have shape (n, d), got {a.shape}")
        if n is not None and a.shape[0] != n:
            raise InputError(f"activations[{label!r}]", f"has {a.shape[0]} rows, the first panel has {n}")
        n = a.shape[0]
        panels[str(label)] = a
    if n < 4:
        raise InputError("activations", f"t-SNE needs at least 4 voxels, got {n}")
    rows = {}
    for label, value in colours.items():
        c = real_finite_array(value, f"colours[{label!r}]")
        if c.shape != (n,):
            raise InputError(f"colours[{label!r}]", f"must have shape ({n},) like the activations, got {c.shape}")
        rows[str(label)] = c

    rng = np.random.default_rng(int(random_state))
    keep = np.arange(n) if max_points is None or n <= max_points else np.sort(rng.choice(n, max_points, replace=False))
    perplexity = min(perplexity, (keep.size - 1) / 3.0)

    # One OpenMP thread: scikit-learn's Barnes-Hut gradient runs several times slower when its
    # spinning workers share the cores with other processes (8.6 s against 32 s for 2000 points on a
    # busy 2-core machine).
    with _one_openmp_thread():
        embeddings = {label: _embed(a[keep], perplexity, pca_components, int(max_iter), int(random_state))
                      for label, a in panels.items()}

    fig, axes = plt.subplots(len(rows), len(panels), figsize=(3.0 * len(panels) + 0.8, 2.8 * len(rows)),
                             squeeze=False, layout="constrained")
    for row, (colour_label, values) in enumerate(rows.items()):
        c = values[keep]
        vmin, vmax = float(c.min()), float(c.max())
        scatter = None
        for col, (label, y) in enumerate(embeddings.items()):
            ax = axes[row, col]
            if y is None:
                ax.text(0.5, 0.5, "constant activations", ha="center", va="center", transform=ax.transAxes)
            else:
                scatter = ax.scatter(y[:, 0], y[:, 1], c=c, s=4, cmap="viridis", vmin=vmin, vmax=vmax,
                                     linewidths=0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"colour: {colour_label}")
        if scatter is not None:
            fig.colorbar(scatter, ax=list(axes[row]), label=colour_label, shrink=0.9)
    if title:
        fig.suptitle(title)
    return write_bytes(Path(path), figure_to_png(fig))
