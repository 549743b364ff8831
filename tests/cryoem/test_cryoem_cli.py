"""``bioinverse cryoem simulate | refine | fsc | density | implicit`` end to end on a tiny model, and the figures
they draw."""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bioinverse.cli import main
from bioinverse.cryoem.density import atoms_to_map
from bioinverse.cryoem.figures import angular_error_figure, fsc_figure, slices_figure
from bioinverse.cryoem.implicit import load_implicit
from bioinverse.cryoem.io import (
    read_atoms,
    read_fsc_star,
    read_map,
    read_map_origin,
    read_particle_stack,
    read_particles,
    read_stack,
    write_map,
    write_particles,
)
from bioinverse.cryoem.refine import soft_sphere_mask
from bioinverse.cryoem.rotations import angular_distance, euler_to_matrix
from bioinverse.errors import InputError
from bioinverse.fourier import FSCCurve, fsc

MODEL = Path(__file__).parent / "data" / "helix8.pdb"
BOX, APIX, N = 24, 2.0, 100
# Small, fast settings: 30° then 15° sampling, shifts within 2 px, first iteration at 12 Å.
FAST = ["--healpix-order", "1", "--max-healpix-order", "2", "--ini-high", "12", "--offset-range", "2", "--no-progress"]


def run(argv, capsys):
    """Exit status, stdout and stderr of ``bioinverse`` with ``argv``."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    code = exc.value.code if isinstance(exc.value.code, int) else (0 if exc.value.code is None else 1)
    return code, captured.out, captured.err


def assert_user_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One simulation and one 2-iteration refinement (with --truth) shared by the tests of this file.

    capsys is per test, so this module-wide fixture captures the commands' output itself.
    """
    root = tmp_path_factory.mktemp("cryoem_cli")
    outputs = {}
    for name, argv in (
        ("simulate", ["cryoem", "simulate", "--model", MODEL, "--box", BOX, "--apix", APIX, "--n", N, "--snr", 2.0,
                      "--defocus", "1.0:2.5", "--out", root / "sim", "--seed", 3]),
        ("refine", ["cryoem", "refine", root / "sim" / "particles.star", "--reference", root / "sim" / "reference.mrc",
                    "--out", root / "refine", "--max-iterations", 2, "--truth", root / "sim" / "particles.star",
                    *FAST]),
    ):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exc:
            main([str(a) for a in argv])
        assert exc.value.code in (0, None), stderr.getvalue()
        outputs[name] = stdout.getvalue()
    return {"root": root, "sim": root / "sim", "refine": root / "refine", "printed": outputs}


# --------------------------------------------------------------------------------------------------
# simulate


def test_simulate_writes_a_set_that_reads_back(session):
    sim = session["sim"]
    images, particles = read_particle_stack(sim / "particles.star")
    assert images.shape == (N, BOX, BOX)
    assert particles.has_poses and particles.pixel_size.tolist() == [APIX]
    defocus_um = particles.defocus_u / 1e4
    assert defocus_um.min() >= 1.0 and defocus_um.max() <= 2.5
    for name in ("ground_truth.mrc", "reference.mrc"):
        volume, voxel = read_map(sim / name)
        assert volume.shape == (BOX,) * 3 and voxel == pytest.approx(APIX)
    printed = session["printed"]["simulate"]
    for name in ("particles.mrcs", "particles.star", "ground_truth.mrc", "reference.mrc"):
        assert re.search(rf"^wrote \S*{re.escape(name)} \(", printed, re.MULTILINE), printed
    snr = float(re.search(r"^SNR: ([0-9.]+)", printed, re.MULTILINE).group(1))
    assert snr == pytest.approx(2.0, rel=1e-3)
    # Independent check of the SNR: unit-variance noise plus signal of variance SNR per pixel.
    assert images.var(axis=(1, 2)).mean() == pytest.approx(1.0 + 2.0, rel=0.05)


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--defocus", "abc"], ["--defocus", "min:max"]),
        (["--defocus", "2.0:0.5"], ["--defocus", "0 < min ≤ max"]),
        (["--defocus", "1:2:3"], ["--defocus"]),
        (["--box", "8", "--apix", "1.0"], ["helix8.pdb", "does not fit", "box is too small"]),
        (["--box", "23"], ["--box", "even"]),
        (["--snr", "0"], ["--snr", "positive"]),
        (["--n", "0"], ["--n", "at least 1"]),
    ],
)
def test_simulate_user_errors(tmp_path, capsys, options, fragments):
    base = {"--model": MODEL, "--box": 24, "--apix": 2.0, "--n": 10, "--snr": 1.0, "--out": tmp_path / "s"}
    for k in range(0, len(options), 2):
        base[options[k]] = options[k + 1]
    argv = ["cryoem", "simulate"] + [x for pair in base.items() for x in pair]
    code, _, err = run(argv, capsys)
    assert_user_error(code, err, *fragments)
    assert not (tmp_path / "s" / "particles.star").exists()


def test_simulate_missing_model(tmp_path, capsys):
    code, _, err = run(["cryoem", "simulate", "--model", tmp_path / "none.pdb", "--n", 5, "--snr", 1,
                        "--out", tmp_path / "s"], capsys)
    assert_user_error(code, err, "none.pdb", "no such file")


# --------------------------------------------------------------------------------------------------
# refine


def test_refine_writes_every_output(session):
    out = session["refine"]
    for name in ("half1.mrc", "half2.mrc", "map.mrc", "fsc.star", "fsc.png", "particles.star", "history.json",
                 "angular_error.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    for name in ("half1.mrc", "half2.mrc", "map.mrc"):
        volume, voxel = read_map(out / name)
        assert volume.shape == (BOX,) * 3 and voxel == pytest.approx(APIX) and volume.std() > 0
    assert (out / "fsc.png").read_bytes().startswith(b"\x89PNG")
    assert not list(out.glob(".tmp-*"))  # atomic writes leave nothing behind

    history = json.loads((out / "history.json").read_text())
    assert [record["iteration"] for record in history["iterations"]] == [1, 2]
    assert history["converged"] is False
    assert history["iterations"][0]["mean_angle_change_deg"] is None  # NaN (no previous pose) → null
    assert "iteration 1:" in session["printed"]["refine"] and "iteration 2:" in session["printed"]["refine"]


def test_refined_particles_read_back_with_poses_and_subsets(session):
    sim, out = session["sim"], session["refine"]
    images, particles = read_particle_stack(out / "particles.star")  # image names resolve from OUT
    original, truth = read_particle_stack(sim / "particles.star")
    np.testing.assert_array_equal(images, original)
    assert particles.has_poses
    assert set(np.unique(particles.random_subset)) == {1, 2}
    assert particles.max_probability is not None
    assert ((particles.max_probability > 0) & (particles.max_probability <= 1)).all()
    # CTF and optics carried over unchanged
    np.testing.assert_allclose(particles.defocus_u, truth.defocus_u, rtol=1e-6)
    # refined shifts stay on the search grid around the input origins (the first search's centres)
    shift_steps = (particles.origins - truth.origins) / APIX
    np.testing.assert_allclose(shift_steps * 2, np.round(shift_steps * 2), atol=1e-4)
    counts = [int(np.sum(particles.random_subset == h)) for h in (1, 2)]
    for h, count in zip((1, 2), counts):
        assert f"half map {h}, {count} particles" in session["printed"]["refine"]


def test_fsc_star_round_trip_matches_reported_resolution(session):
    out = session["refine"]
    curve = read_fsc_star(out / "fsc.star")
    assert len(curve) == BOX // 2 + 1 and curve.pixel_size == pytest.approx(APIX)
    history = json.loads((out / "history.json").read_text())
    assert curve.resolution(0.143) == pytest.approx(history["resolution_A"], rel=1e-3)
    printed = float(re.search(r"resolution \(FSC 0\.143\): ([0-9.]+) Å", session["printed"]["refine"]).group(1))
    assert printed == pytest.approx(history["resolution_A"], abs=0.006)


def test_truth_error_is_the_angle_between_refined_and_true_poses(session):
    refined = read_particles(session["refine"] / "particles.star")
    truth = read_particles(session["sim"] / "particles.star")
    errors = angular_distance(euler_to_matrix(*truth.angles.T), euler_to_matrix(*refined.angles.T))
    printed = float(re.search(r"median angular error: ([0-9.]+)°", session["printed"]["refine"]).group(1))
    assert printed == pytest.approx(np.median(errors), abs=0.006)
    history = json.loads((session["refine"] / "history.json").read_text())
    assert history["truth"]["median_angular_error_deg"] == pytest.approx(np.median(errors))


def test_resume_and_truth_matched_by_image(session, tmp_path, capsys):
    """A rerun resumes from the checkpoint; a truth file elsewhere, shuffled, matches by image."""
    out = tmp_path / "refine"
    shutil.copytree(session["refine"], out)
    before = read_map(out / "map.mrc")[0]
    truth = read_particles(session["sim"] / "particles.star")
    order = np.random.default_rng(0).permutation(len(truth))
    shuffled = truth.subset(order)
    (tmp_path / "elsewhere").mkdir()
    shuffled.image_names = [f"{name.split('@')[0]}@../{session['sim'].name}/particles.mrcs"
                            for name in shuffled.image_names]
    # the stack is reached from the new folder through a link to the simulation's folder
    (tmp_path / session["sim"].name).symlink_to(session["sim"], target_is_directory=True)
    write_particles(tmp_path / "elsewhere" / "truth.star", shuffled)

    argv = ["cryoem", "refine", session["sim"] / "particles.star", "--reference", session["sim"] / "reference.mrc",
            "--out", out, "--max-iterations", 2, "--truth", tmp_path / "elsewhere" / "truth.star", *FAST]
    code, printed, err = run(argv, capsys)
    assert code == 0, err
    assert "resuming after iteration 2" in printed
    assert "iteration 1:" not in printed and "iteration 2:" not in printed  # nothing redone
    np.testing.assert_array_equal(read_map(out / "map.mrc")[0], before)
    median = re.search(r"median angular error: ([0-9.]+)°", printed).group(1)
    assert median == re.search(r"median angular error: ([0-9.]+)°", session["printed"]["refine"]).group(1)

    argv[argv.index("--max-iterations") + 1] = 3
    code, printed, err = run(argv, capsys)
    assert code == 0, err
    assert "resuming after iteration 2" in printed and "iteration 3:" in printed
    assert "iteration 2:" not in printed
    history = json.loads((out / "history.json").read_text())
    assert [record["iteration"] for record in history["iterations"]] == [1, 2, 3]


def _refine_argv(session, out, **changes):
    options = {"--reference": session["sim"] / "reference.mrc", "--out": out}
    options.update(changes)
    star = options.pop("star", session["sim"] / "particles.star")
    return ["cryoem", "refine", star, *FAST, *[x for pair in options.items() for x in pair]]


def test_refine_user_errors(session, tmp_path, capsys):
    sim = session["sim"]
    cases = []
    write_map(tmp_path / "small.mrc", np.zeros((16,) * 3, np.float32), APIX)
    cases.append(({"--reference": tmp_path / "small.mrc"}, ["small.mrc", "24³"]))
    write_map(tmp_path / "coarse.mrc", np.zeros((BOX,) * 3, np.float32), 3.0)
    cases.append(({"--reference": tmp_path / "coarse.mrc"}, ["coarse.mrc", "voxel size 3 Å", "2 Å"]))
    cases.append(({"--reference": tmp_path / "none.mrc"}, ["none.mrc", "no such file"]))
    cases.append(({"star": tmp_path / "none.star"}, ["none.star", "no such file"]))
    cases.append(({"--out": sim}, ["--out", "would overwrite"]))
    (tmp_path / "file").write_text("x")
    cases.append(({"--out": tmp_path / "file"}, ["file", "not a directory"]))
    partial = read_particles(sim / "particles.star").subset(np.arange(10))
    write_particles(sim / "partial_truth.star", partial)
    cases.append(({"--truth": sim / "partial_truth.star"}, ["partial_truth.star", "has no pose for particle 11"]))
    no_poses = read_particles(sim / "particles.star")
    no_poses.has_poses = False
    write_particles(sim / "no_poses.star", no_poses)
    cases.append(({"--truth": sim / "no_poses.star"}, ["no_poses.star", "has no poses"]))
    write_particles(sim / "four.star", read_particles(sim / "particles.star").subset([0, 1, 2]))
    cases.append(({"star": sim / "four.star"}, ["four.star", "at least 4"]))
    cases.append(({"--max-healpix-order": 0}, ["--max-healpix-order"]))
    cases.append(({"--diameter": -5}, ["--diameter", "positive"]))
    cases.append(({"--max-iterations": 0}, ["--max-iterations"]))
    for changes, fragments in cases:
        code, _, err = run(_refine_argv(session, tmp_path / "out", **changes), capsys)
        assert_user_error(code, err, *fragments)
    assert not (tmp_path / "out" / "map.mrc").exists()


# --------------------------------------------------------------------------------------------------
# fsc


@pytest.fixture
def maps(tmp_path):
    rng = np.random.default_rng(5)
    box = 32
    k = np.fft.fftfreq(box)
    radius2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    signal = np.fft.ifftn(np.fft.fftn(rng.standard_normal((box,) * 3)) * np.exp(-radius2 / 0.03)).real
    signal /= signal.std()
    data = {"h1": signal + 0.5 * rng.standard_normal(signal.shape),
            "h2": signal + 0.5 * rng.standard_normal(signal.shape), "ref": signal}
    for name, volume in data.items():
        write_map(tmp_path / f"{name}.mrc", volume, 1.5)
    return {name: read_map(tmp_path / f"{name}.mrc")[0] for name in data}


def _printed(pattern, text):
    return float(re.search(pattern, text).group(1))


def test_fsc_with_mask_and_reference(tmp_path, capsys, maps):
    code, out, err = run(["cryoem", "fsc", tmp_path / "h1.mrc", tmp_path / "h2.mrc", "--mask-diameter", 30,
                          "--reference", tmp_path / "ref.mrc", "--plot", tmp_path / "fsc.png"], capsys)
    assert code == 0, err
    mask = soft_sphere_mask(32, 0.5 * 30 / 1.5, 6.0 / 1.5)
    h1, h2, ref = (maps[k] * mask for k in ("h1", "h2", "ref"))
    half = fsc(h1, h2, 1.5)
    assert _printed(r"resolution \(FSC 0\.143\): ([0-9.]+)", out) == pytest.approx(half.resolution(0.143), abs=0.006)
    assert _printed(r"resolution \(FSC 0\.5\): +([0-9.]+)", out) == pytest.approx(half.resolution(0.5), abs=0.006)
    against = fsc(0.5 * (h1 + h2), ref, 1.5).resolution(0.5)
    assert _printed(r"against ref\.mrc \(FSC 0\.5, average of the half maps\): ([0-9.]+)", out) == pytest.approx(
        against, abs=0.006)
    assert "mask: sphere of 30 Å" in out
    assert (tmp_path / "fsc.png").read_bytes().startswith(b"\x89PNG")
    # the mask changes the result: the unmasked FSC differs
    assert not np.allclose(fsc(maps["h1"], maps["h2"], 1.5).values, half.values, atol=1e-3)


def test_fsc_of_one_full_map_against_a_reference(tmp_path, capsys, maps):
    code, out, err = run(["cryoem", "fsc", tmp_path / "h1.mrc", "--reference", tmp_path / "ref.mrc"], capsys)
    assert code == 0, err
    assert "FSC 0.143" not in out  # no half maps, no gold-standard resolution
    expected = fsc(maps["h1"], maps["ref"], 1.5).resolution(0.5)
    assert _printed(r"against ref\.mrc \(FSC 0\.5, h1\.mrc\): ([0-9.]+)", out) == pytest.approx(expected, abs=0.006)


def test_fsc_user_errors(tmp_path, capsys, maps):
    write_map(tmp_path / "other.mrc", np.zeros((16,) * 3, np.float32), 1.5)
    cases = [
        ([tmp_path / "h1.mrc"], ["HALF2", "--reference"]),
        ([tmp_path / "h1.mrc", tmp_path / "h2.mrc", "--reference", tmp_path / "other.mrc"], ["other.mrc", "shape"]),
        ([tmp_path / "h1.mrc", tmp_path / "h2.mrc", "--mask-diameter", 0], ["--mask-diameter", "positive"]),
        ([tmp_path / "h1.mrc", tmp_path / "none.mrc"], ["none.mrc", "no such file"]),
    ]
    for argv, fragments in cases:
        code, _, err = run(["cryoem", "fsc", *argv], capsys)
        assert_user_error(code, err, *fragments)


# --------------------------------------------------------------------------------------------------
# figures


def _png_size(path):
    import matplotlib.image

    return matplotlib.image.imread(path).shape[:2]


def test_figures(tmp_path):
    curve = FSCCurve(np.arange(9) / 24.0, np.linspace(1, -0.05, 9), np.arange(9) + 1, 3.0)
    other = FSCCurve(np.arange(17) / 32.0, np.linspace(1, 0, 17), np.arange(17) + 1, 1.0)
    assert fsc_figure({"ours": curve, "RELION": other}, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    rng = np.random.default_rng(0)
    errors = {"ours": rng.gamma(2, 2, 300), "RELION": np.append(rng.gamma(2, 1, 300), 170.0)}
    assert angular_error_figure(errors, tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    blob = np.zeros((16,) * 3)
    blob[5:11, 6:10, 7:9] = 1.0
    one = slices_figure({"truth": blob}, tmp_path / "s1.png")
    three = slices_figure({"truth": blob, "ours": 5 * blob + 1, "flat": np.zeros((20,) * 3)}, tmp_path / "s3.png")
    (h1, w1), (h3, w3) = _png_size(one), _png_size(three)
    assert w3 > 2 * w1 and abs(h3 - h1) < 0.2 * h1  # one column per map


def test_figures_reject_bad_input(tmp_path):
    with pytest.raises(InputError, match="curves"):
        fsc_figure({}, tmp_path / "f.png")
    with pytest.raises(InputError, match="not an FSCCurve"):
        fsc_figure({"x": np.ones(5)}, tmp_path / "f.png")
    with pytest.raises(InputError, match="angles ≥ 0"):
        angular_error_figure({"x": np.array([-1.0, 2.0])}, tmp_path / "e.png")
    with pytest.raises(InputError, match="NaN"):
        angular_error_figure({"x": np.array([np.nan])}, tmp_path / "e.png")
    with pytest.raises(InputError, match="cubic"):
        slices_figure({"x": np.zeros((4, 4, 5))}, tmp_path / "s.png")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("ignore", [False, True])
def test_shift_search_starts_at_the_origins_unless_told_to_ignore_them(session, tmp_path, capsys, monkeypatch,
                                                                        ignore):
    import bioinverse.cryoem.refine as refine_module

    seen = {}

    def stop(*args, initial_shifts=None, **kwargs):
        seen["shifts"] = initial_shifts
        raise InputError("stop", "here")

    monkeypatch.setattr(refine_module, "refine", stop)
    argv = _refine_argv(session, tmp_path / "out") + (["--ignore-origins"] if ignore else [])
    code, _, err = run(argv, capsys)
    assert_user_error(code, err, "stop")
    if ignore:
        assert seen["shifts"] is None
    else:
        particles = read_particles(session["sim"] / "particles.star")
        np.testing.assert_allclose(seen["shifts"], -particles.origins / APIX)


# --------------------------------------------------------------------------------------------------
# density, implicit fit | render

IMPLICIT_FAST = ["--hidden", "32", "--layers", "2", "--steps", "60", "--batch-size", "2048"]


def test_density_writes_the_model_map(tmp_path, capsys):
    out = tmp_path / "helix.mrc"
    code, stdout, _ = run(["cryoem", "density", MODEL, "--out", out, "--box", 24, "--apix", 2.0], capsys)
    assert code == 0 and "24³ box" in stdout
    volume, voxel = read_map(out)
    assert voxel == pytest.approx(2.0)
    np.testing.assert_allclose(volume, atoms_to_map(read_atoms(MODEL), 24, 2.0), rtol=1e-6, atol=1e-8)


def test_fit_then_render_on_the_same_and_on_a_finer_grid(tmp_path, capsys):
    volume = atoms_to_map(read_atoms(MODEL), 24, 2.0)
    map_path = tmp_path / "helix.mrc"
    write_map(map_path, volume, 2.0, origin=(-24.0, -24.0, -24.0))
    model_path = tmp_path / "helix.pt"
    plot = tmp_path / "fsc.png"
    code, stdout, err = run(["cryoem", "implicit", "fit", map_path, "--out", model_path, *IMPLICIT_FAST, "--plot", plot],
                            capsys)
    assert code == 0, err
    assert "compression ratio" in stdout and "Nyquist 4.00 Å" in stdout
    assert plot.stat().st_size > 0 and not model_path.with_name("helix.pt.ckpt").exists()
    reported = float(stdout.split("(FSC 0.5): ")[1].split(" Å")[0])

    same = tmp_path / "same.mrc"
    code, _, err = run(["cryoem", "implicit", "render", model_path, "--out", same], capsys)
    assert code == 0, err
    rendered, voxel = read_map(same)
    assert rendered.shape == (24, 24, 24) and voxel == pytest.approx(2.0)
    assert read_map_origin(same) == pytest.approx((-24.0, -24.0, -24.0))
    assert fsc(rendered, volume, 2.0).resolution(0.5) == pytest.approx(reported, abs=0.01)

    fine = tmp_path / "fine.mrc"
    code, _, err = run(["cryoem", "implicit", "render", model_path, "--out", fine, "--apix", 1.0], capsys)
    assert code == 0, err
    upsampled, voxel = read_map(fine)
    assert upsampled.shape == (48, 48, 48) and voxel == pytest.approx(1.0)
    assert read_map_origin(fine) == pytest.approx((-24.0, -24.0, -24.0))  # voxel 2i over voxel i
    np.testing.assert_allclose(upsampled[::2, ::2, ::2], rendered, atol=1e-5 * np.abs(rendered).max())

    sub = tmp_path / "sub.mrc"
    code, _, err = run(["cryoem", "implicit", "render", model_path, "--out", sub, "--box", 8,
                        "--shift", "4,0,-2"], capsys)
    assert code == 0, err
    part, _ = read_map(sub)
    # Centre voxel 4 of the sub-volume is 4 Å = 2 voxels along x and 1 voxel back along z.
    np.testing.assert_allclose(part[4, 4, 4], rendered[12 - 1, 12, 12 + 2], atol=1e-6 * np.abs(rendered).max())


def test_fit_a_central_slice_and_render_it_as_an_image(tmp_path, capsys):
    volume = atoms_to_map(read_atoms(MODEL), 24, 2.0)
    map_path = tmp_path / "helix.mrc"
    write_map(map_path, volume, 2.0)
    model_path = tmp_path / "slice.pt"
    code, stdout, err = run(["cryoem", "implicit", "fit", map_path, "--out", model_path, "--slice", "z", *IMPLICIT_FAST],
                            capsys)
    assert code == 0, err
    assert "central z slice" in stdout and "(FRC 0.5)" in stdout
    assert load_implicit(model_path).dimensions == 2
    image_path = tmp_path / "slice.mrc"
    code, _, err = run(["cryoem", "implicit", "render", model_path, "--out", image_path], capsys)
    assert code == 0, err
    images, pixel = read_stack(image_path)
    assert images.shape == (1, 24, 24) and pixel == pytest.approx(2.0)


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    volume = atoms_to_map(read_atoms(MODEL), 16, 2.0)
    map_path = tmp_path / "m.mrc"
    write_map(map_path, volume, 2.0)
    code, _, err = run(["cryoem", "implicit", "fit", map_path, "--out", tmp_path / "x.pt", "--network", "relu"],
                       capsys)
    assert_user_error(code, err, "kind", "siren, fourier")
    code, _, err = run(["cryoem", "implicit", "fit", map_path, "--out", tmp_path / "x.pt", "--slice", "w"], capsys)
    assert_user_error(code, err, "slice")
    code, _, err = run(["cryoem", "implicit", "fit", map_path, "--out", tmp_path / "x.pt", "--device", "gpu9"],
                       capsys)
    assert_user_error(code, err, "device", "gpu9")
    code, _, err = run(["cryoem", "implicit", "fit", tmp_path / "none.mrc", "--out", tmp_path / "x.pt"], capsys)
    assert_user_error(code, err, "none.mrc", "no such file")
    code, _, err = run(["cryoem", "implicit", "render", map_path, "--out", tmp_path / "r.mrc"], capsys)
    assert_user_error(code, err, "m.mrc", "model")
    model_path = tmp_path / "m.pt"
    assert run(["cryoem", "implicit", "fit", map_path, "--out", model_path, *IMPLICIT_FAST, "--steps", "2"], capsys)[0] == 0
    code, _, err = run(["cryoem", "implicit", "render", model_path, "--out", tmp_path / "r.mrc", "--shift", "1,2"],
                       capsys)
    assert_user_error(code, err, "--shift")
    code, _, err = run(["cryoem", "density", tmp_path / "none.pdb", "--out", tmp_path / "d.mrc"], capsys)
    assert_user_error(code, err, "none.pdb")


def test_refine_with_a_learned_prior_and_its_errors(session, tmp_path, capsys):
    import torch

    from bioinverse.cryoem.denoiser import DenoiserArchitecture, MapDenoiser

    torch.manual_seed(0)
    architecture = DenoiserArchitecture(levels=4, base_channels=2)
    path = MapDenoiser(architecture.build(), architecture, BOX, APIX).save(tmp_path / "denoiser.pt")
    star, reference = session["sim"] / "particles.star", session["sim"] / "reference.mrc"
    code, out, err = run(["cryoem", "refine", star, "--reference", reference, "--out", tmp_path / "red",
                          "--max-iterations", 2, "--prior", "red", "--lambda", 0.5, "--denoiser", path, *FAST], capsys)
    assert code == 0, err
    history = json.loads((tmp_path / "red" / "history.json").read_text())
    assert [record["prior_weight"] for record in history["iterations"]] == [0.5, 0.5]
    assert not np.allclose(read_map(tmp_path / "red" / "map.mrc")[0], read_map(session["refine"] / "map.mrc")[0])
    code, _, err = run(["cryoem", "refine", star, "--reference", reference, "--out", tmp_path / "x",
                        "--prior", "tv", *FAST], capsys)
    assert_user_error(code, err, "prior", "gaussian, red, cwred")
    code, _, err = run(["cryoem", "refine", star, "--reference", reference, "--out", tmp_path / "x",
                        "--prior", "red", "--lambda", 2, "--denoiser", path, *FAST], capsys)
    assert_user_error(code, err, "λ must be in [0, 1]")
    bigger = MapDenoiser(architecture.build(), architecture, 2 * BOX, APIX).save(tmp_path / "big.pt")
    code, _, err = run(["cryoem", "refine", star, "--reference", reference, "--out", tmp_path / "x",
                        "--prior", "cwred", "--denoiser", bigger, *FAST], capsys)
    assert_user_error(code, err, "reference.mrc", "trained on 48³")
