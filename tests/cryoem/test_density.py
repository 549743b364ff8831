import math
from pathlib import Path

import gemmi
import numpy as np
import pytest

from bioinverse.cryoem.density import MIN_SIGMA_PIXELS, antialias_blur, atoms_to_map
from bioinverse.cryoem.io import Atoms, read_atoms
from bioinverse.errors import InputError

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def helix():
    return read_atoms(DATA / "helix8.pdb")


def gemmi_map(atoms: Atoms, box: int, pixel_size: float, blur: float, use_atom_bfactors: bool) -> np.ndarray:
    """gemmi.DensityCalculatorE on a P1 cell of the box's size, as [z, y, x] (gemmi stores [x, y, z])."""
    structure = gemmi.Structure()
    structure.cell = gemmi.UnitCell(box * pixel_size, box * pixel_size, box * pixel_size, 90, 90, 90)
    structure.spacegroup_hm = "P 1"
    model, chain = gemmi.Model("1"), gemmi.Chain("A")
    for k, (position, element, b, q) in enumerate(zip(atoms.positions, atoms.elements, atoms.b_factors,
                                                      atoms.occupancies)):
        residue = gemmi.Residue()
        residue.name, residue.seqid = "UNK", gemmi.SeqId(k + 1, " ")
        atom = gemmi.Atom()
        atom.name, atom.element, atom.pos = element, gemmi.Element(element), gemmi.Position(*position)
        atom.b_iso, atom.occ = (b if use_atom_bfactors else 0.0), q
        residue.add_atom(atom)
        chain.add_residue(residue)
    model.add_chain(chain)
    structure.add_model(model)
    calculator = gemmi.DensityCalculatorE()
    calculator.grid.set_unit_cell(structure.cell)
    calculator.grid.set_size(box, box, box)
    calculator.blur = blur
    calculator.put_model_density_on_grid(structure[0])
    return np.array(calculator.grid, copy=True).transpose(2, 1, 0)


@pytest.mark.parametrize("bfactor, use_atom_bfactors", [(0.0, False), (60.0, False), (0.0, True), (10.0, True)])
def test_agrees_with_gemmi(helix, bfactor, use_atom_bfactors):
    box, px = 52, 1.0  # the model spans 14–39 Å: far from the cell edges where gemmi wraps around
    ours = atoms_to_map(helix, box, px, bfactor=bfactor, centre=False, use_atom_bfactors=use_atom_bfactors)
    blur = bfactor + antialias_blur(helix, px, bfactor, use_atom_bfactors)
    reference = gemmi_map(helix, box, px, blur, use_atom_bfactors)
    assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.99999
    np.testing.assert_allclose(ours, reference, atol=2e-4 * reference.max())  # same scale, voxel by voxel
    assert ours.sum() == pytest.approx(reference.sum(), rel=1e-3)


def test_agrees_with_gemmi_without_antialiasing_on_a_coarse_grid(helix):
    ours = atoms_to_map(helix, 36, 1.5, bfactor=5.0, centre=False, antialias=False)
    reference = gemmi_map(helix, 36, 1.5, 5.0, False)
    np.testing.assert_allclose(ours, reference, atol=1e-4 * reference.max())


def test_many_atoms_over_several_blocks_agree_with_gemmi():
    rng = np.random.default_rng(4)
    atoms = Atoms(np.clip(rng.normal(24.0, 5.0, (3000, 3)), 12, 36), rng.choice(["C", "N", "O", "S"], 3000),
                  occupancies=rng.uniform(0.5, 1.0, 3000))
    ours = atoms_to_map(atoms, 48, 1.0, bfactor=40.0, centre=False)
    reference = gemmi_map(atoms, 48, 1.0, 40.0, False)
    np.testing.assert_allclose(ours, reference, atol=2e-4 * reference.max())


def test_single_atom_closed_form():
    """An atom on a voxel centre: the peak is Σ a_i (4π/b_i)^{3/2}, the integral Σ a_i."""
    coefficients = gemmi.Element("O").c4322
    a, b = np.array(coefficients.a), np.array(coefficients.b) + 80.0
    rho = atoms_to_map(Atoms([[3.0, 3.0, 3.0]], ["O"]), 24, 1.0, bfactor=80.0)
    assert rho[12, 12, 12] == pytest.approx(np.sum(a * (4 * math.pi / b) ** 1.5), rel=1e-6)
    assert rho.sum() == pytest.approx(a.sum(), rel=1e-4)
    # one voxel along x: each Gaussian falls by exp(-4π² p² / b)
    expected = np.sum(a * (4 * math.pi / b) ** 1.5 * np.exp(-4 * math.pi**2 / b))
    assert rho[12, 12, 13] == pytest.approx(expected, rel=1e-6)


def test_antialiasing_keeps_the_integral_at_any_sub_voxel_position():
    rng = np.random.default_rng(0)
    integral = sum(gemmi.Element("C").c4322.a)
    for offset in rng.uniform(0, 1, (4, 3)):
        atom = Atoms([8.0 + offset], ["C"])
        smooth = atoms_to_map(atom, 16, 1.0, centre=False)
        assert smooth.sum() == pytest.approx(integral, rel=1e-3)
        aliased = atoms_to_map(atom, 16, 1.0, centre=False, antialias=False)
        assert abs(aliased.sum() / integral - 1) > 1e-2  # point samples of the sharp terms miss the integral


def test_antialias_blur_value(helix):
    carbon = Atoms([[0.0, 0.0, 0.0]], ["C"])
    floor = 8 * math.pi**2 * (MIN_SIGMA_PIXELS * 1.5) ** 2
    assert antialias_blur(carbon, 1.5) == pytest.approx(floor - gemmi.Element("C").c4322.b[0])
    assert antialias_blur(carbon, 1.5, bfactor=floor) == 0.0
    # the model's narrowest term decides: sulphur's b_1 (0.2 Å²) is below carbon's (0.25 Å²)
    assert antialias_blur(helix, 1.5) == pytest.approx(floor - min(gemmi.Element(e).c4322.b[0] for e in "CNOHS"))
    assert antialias_blur(helix, 1.5, use_atom_bfactors=True) == pytest.approx(
        floor - min(b + gemmi.Element(e).c4322.b[0] for b, e in zip(helix.b_factors, helix.elements)))


def test_centring_puts_the_centre_of_mass_on_the_box_origin(helix):
    box = 40
    rho = atoms_to_map(helix, box, 1.0, bfactor=20.0).astype(np.float64)
    grid = np.indices(rho.shape).reshape(3, -1)
    centre_of_mass = grid @ rho.ravel() / rho.sum()
    np.testing.assert_allclose(centre_of_mass, [box // 2] * 3, atol=0.01)
    atom = atoms_to_map(Atoms([[-31.4, 7.2, 100.0]], ["N"]), 16, 1.3)
    assert np.unravel_index(atom.argmax(), atom.shape) == (8, 8, 8)
    # without centring, coordinates are kept: voxel [k, j, i] sits at (i, j, k) × pixel size
    kept = atoms_to_map(Atoms([[2.6, 5.2, 7.8]], ["N"]), 16, 1.3, centre=False)
    assert np.unravel_index(kept.argmax(), kept.shape) == (6, 4, 2)


def test_bfactor_broadening_lowers_the_peak_and_keeps_the_integral(helix):
    maps = [atoms_to_map(helix, 48, 1.0, bfactor=b) for b in (40.0, 80.0, 160.0)]
    peaks = [m.max() for m in maps]
    assert peaks[0] > peaks[1] > peaks[2]
    sums = [m.sum() for m in maps]
    np.testing.assert_allclose(sums, sums[0], rtol=1e-3)
    expected = sum(q * sum(gemmi.Element(e).c4322.a) for e, q in zip(helix.elements, helix.occupancies))
    assert sums[0] == pytest.approx(expected, rel=1e-3)
    # the model's own B-factors broaden too
    assert atoms_to_map(helix, 48, 1.0, bfactor=40.0, use_atom_bfactors=True).max() < peaks[0]


def test_edge_atoms_are_truncated_not_wrapped():
    near_edge = atoms_to_map(Atoms([[0.3, 8.0, 8.0]], ["C"]), 16, 1.0, centre=False)
    inside = atoms_to_map(Atoms([[8.3, 8.0, 8.0]], ["C"]), 24, 1.0, centre=False)
    np.testing.assert_allclose(near_edge, inside[:16, :16, 8:24], atol=1e-7)
    assert near_edge[:, :, -3:].max() < 1e-6


def test_atoms_outside_the_box(helix):
    with pytest.raises(InputError, match=r"helix8.pdb: does not fit in a 8-voxel box \(16.0 Å\) once centred.*"
                                         r"box is too small, it needs at least 20.0 Å \(10 voxels"):
        atoms_to_map(helix, 8, 2.0)
    with pytest.raises(InputError, match="box is too small, it needs at least 42.0 Å"):
        atoms_to_map(helix, 32, 1.0, centre=False)  # atoms up to 39.2 Å
    with pytest.raises(InputError, match="negative coordinates"):
        atoms_to_map(Atoms([[-1.0, 2.0, 2.0]], ["C"]), 16, 1.0, centre=False)
    atoms_to_map(helix, 10, 2.0)  # the size the message asks for is enough


def test_argument_checks(helix):
    with pytest.raises(InputError, match="box"):
        atoms_to_map(helix, 33, 1.0)
    with pytest.raises(InputError, match="pixel_size"):
        atoms_to_map(helix, 32, 0.0)
    with pytest.raises(InputError, match="bfactor"):
        atoms_to_map(helix, 32, 1.0, bfactor=-5.0)
    with pytest.raises(InputError, match="atoms"):
        atoms_to_map(np.zeros((3, 3)), 32, 1.0)
    with pytest.raises(InputError, match=r"element X \(1 atoms\)"):
        atoms_to_map(Atoms([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], ["C", "X"]), 16, 1.0)
    with pytest.raises(InputError, match="negative B-factors"):
        atoms_to_map(Atoms([[0.0, 0.0, 0.0]], ["C"], b_factors=[-3.0]), 16, 1.0, use_atom_bfactors=True)
