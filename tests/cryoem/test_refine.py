"""Gold-standard MAP-EM refinement: recovery of a known map, true-pose reconstruction, resume, bad input."""

import numpy as np
import pytest

from bioinverse.cryoem.refine import RefineConfig, reconstruct_with_poses, refine, soft_sphere_mask
from bioinverse.cryoem.rotations import angular_distance, euler_to_matrix
from bioinverse.cryoem.simulate import simulate_particles
from bioinverse.errors import InputError
from bioinverse.fourier import fsc

BOX, APIX = 24, 3.0


@pytest.fixture(scope="module")
def clean_set(blobs24):
    return simulate_particles(blobs24, APIX, n=240, snr=50.0, defocus=(1.0, 2.5), max_shift=1.0,
                              reference_resolution=20.0, seed=4)


def _config(**changes):
    settings = {"particle_diameter": 66.0, "initial_resolution": 20.0, "healpix_order": 1,
                "max_healpix_order": 3, "offset_range": 2.0, "offset_step": 1.0, "max_iterations": 8}
    settings.update(changes)
    return RefineConfig(**settings)


def test_refinement_recovers_a_known_map_from_clean_projections(clean_set):
    sim = clean_set
    ctf = sim.particles.ctf_parameters()._asdict()
    result = refine(sim.images, APIX, ctf, sim.reference, _config())
    errors = angular_distance(euler_to_matrix(*result.angles.T), euler_to_matrix(*sim.particles.angles.T))
    assert np.median(errors) < 6.0  # the finest grid here has 7.5° steps
    assert np.mean(errors > 20.0) < 0.1
    assert np.median(np.abs(result.shifts - sim.shifts)) < 0.5
    mask = soft_sphere_mask(BOX, 11.0, 2.0)
    _, best, _ = reconstruct_with_poses(sim.images, APIX, ctf, sim.particles.angles, sim.shifts)
    bound = fsc(best * mask, sim.ground_truth * mask, APIX).resolution(0.5)
    against_truth = fsc(result.final_map * mask, sim.ground_truth * mask, APIX).resolution(0.5)
    assert against_truth < bound + 1.0  # the 20 Å start ends within 1 Å of what the true poses give
    assert result.resolution < 10.0
    assert len(result.history) >= 3 and result.history[-1]["search"] == "local"


def test_true_poses_reconstruct_the_map(clean_set):
    sim = clean_set
    _, final, curve = reconstruct_with_poses(sim.images, APIX, sim.particles.ctf_parameters()._asdict(),
                                                  sim.particles.angles, sim.shifts)
    assert curve[1:7].min() > 0.85  # beyond, these smooth blobs have next to no power left
    mask = soft_sphere_mask(BOX, 11.0, 2.0)
    assert fsc(final * mask, sim.ground_truth * mask, APIX).resolution(0.5) < 9.0
    assert np.corrcoef(final.ravel(), sim.ground_truth.ravel())[0, 1] > 0.95


def test_an_interrupted_refinement_resumes_from_its_checkpoint(clean_set, tmp_path):
    sim = clean_set
    ctf = sim.particles.ctf_parameters()._asdict()
    lines = []
    first = refine(sim.images, APIX, ctf, sim.reference, _config(max_iterations=2),
                   checkpoint=tmp_path / "state.pt")
    again = refine(sim.images, APIX, ctf, sim.reference, _config(max_iterations=2),
                   checkpoint=tmp_path / "state.pt", log=lines.append)
    assert lines == ["resuming after iteration 2"]
    np.testing.assert_array_equal(again.half_maps, first.half_maps)
    more = refine(sim.images, APIX, ctf, sim.reference, _config(max_iterations=3), checkpoint=tmp_path / "state.pt")
    assert [h["iteration"] for h in more.history] == [1, 2, 3]
    other = refine(sim.images, APIX, ctf, sim.reference, _config(max_iterations=1, offset_step=0.5),
                   checkpoint=tmp_path / "state.pt")
    assert len(other.history) == 1  # other settings: the checkpoint is not reused


def test_bad_input_is_rejected(clean_set):
    sim = clean_set
    ctf = sim.particles.ctf_parameters()._asdict()
    with pytest.raises(InputError, match="reference"):
        refine(sim.images, APIX, ctf, sim.reference[:-2, :-2, :-2], _config())
    with pytest.raises(InputError, match="images"):
        refine(sim.images[:, :-1, :-1], APIX, ctf, sim.reference, _config())
    with pytest.raises(InputError, match="defocus_u"):
        refine(sim.images, APIX, {k: v for k, v in ctf.items() if k != "defocus_u"}, sim.reference, _config())
    with pytest.raises(InputError, match="half"):
        refine(sim.images, APIX, ctf, sim.reference, _config(), half=np.ones(len(sim.images), int))
    with pytest.raises(InputError, match="healpix_order"):
        RefineConfig(healpix_order=4, max_healpix_order=3)
