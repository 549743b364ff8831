"""Implicit-representation demo: a SIREN of 24 thousand parameters stands for a 64³ protein map.

The Coulomb potential of adenylate kinase (the synthetic helical bundle of the cryo-EM demo when the
structure cannot be fetched) in a 64³ box of 1.5 Å voxels is fitted by a SIREN eleven times smaller
than the map (:func:`bioinverse.cryoem.implicit.fit_map`), rendered on the same grid and at 0.75 Å,
and scored by FSC against the map and against the same model computed at 0.75 Å. ``python -m
benchmarks cryoem_implicit`` adds the sizes, Fourier features and siren-pytorch.
"""

from __future__ import annotations

from pathlib import Path

from bioinverse.report import Section
from bioinverse.showcase import register_demo

BOX, PIXEL_SIZE, STEPS = 64, 1.5, 1600


@register_demo("cryoem_implicit", "Cryo-EM: a protein map as a SIREN (neural implicit representation)")
def demo(workdir: Path, section: Section) -> None:
    from bioinverse.cryoem.density import atoms_to_map
    from bioinverse.cryoem.figures import fsc_figure, slices_figure
    from bioinverse.cryoem.implicit import FitSettings, fit_map
    from bioinverse.showcase.cryoem import demo_protein

    atoms, source = demo_protein()
    volume = atoms_to_map(atoms, BOX, PIXEL_SIZE)
    fine_truth = atoms_to_map(atoms, 2 * BOX, PIXEL_SIZE / 2)
    model = fit_map(volume, PIXEL_SIZE, settings=FitSettings(steps=STEPS))
    rendered = model.render()
    curves = {"SIREN render vs map": model.evaluate(volume),
              "2x render vs the 0.75 Å map": model.evaluate(fine_truth, PIXEL_SIZE / 2)}
    section.paragraph(
        f"The map of {source}, box {BOX} at {PIXEL_SIZE} Å/voxel, fitted by a SIREN of 4 sine layers of "
        f"{model.architecture.hidden_features} units ({model.n_parameters:,} parameters, compression ratio "
        f"{model.compression_ratio:.1f}) in {model.record['steps']} steps of {model.record['settings']['batch_size']} "
        f"voxels ({model.record['seconds']:.0f} s). The 2× render evaluates the same network at 0.75 Å; it is "
        "compared with the model's map computed at 0.75 Å, not with an interpolation.")
    section.table(
        [["render vs map (FSC 0.5)", f"{curves['SIREN render vs map'].resolution(0.5):.2f} Å"],
         ["Nyquist", f"{2 * PIXEL_SIZE:.2f} Å"],
         ["FSC at Nyquist", f"{curves['SIREN render vs map'].values[-1]:.3f}"],
         ["2× render vs the 0.75 Å map (FSC 0.5)", f"{curves['2x render vs the 0.75 Å map'].resolution(0.5):.2f} Å"]],
        header=["measure", "value"])
    maps = {"map": volume, "SIREN render": rendered, "difference (own grey scale)": rendered - volume}
    section.figure(slices_figure(maps, workdir / "slices.png").read_bytes(),
                   "Central slices: the map, the network's render on the same grid, and their difference, each "
                   "on its own grey scale.")
    section.figure(fsc_figure(curves, workdir / "fsc.png", thresholds=(0.5,)).read_bytes(),
                   "FSC of the render against the map, and of the 2× render against the true finer map.")
