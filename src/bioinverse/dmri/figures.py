"""Figures of the dMRI comparisons: maps side by side with the truth, and RMSE against scan length.

Shared by the showcase demo and the ``dmri_qspace`` benchmark; each returns a matplotlib figure
(render it with :func:`bioinverse.report.figure_to_png`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bioinverse.dmri.phantom import Phantom

__all__ = ["maps_figure", "rmse_curve_figure"]

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
