"""End to end through the ``bioinverse dmri`` microstructure commands, on a few simulated voxels."""

import functools
import shutil

import numpy as np
import pytest

from bioinverse.cli import main
from bioinverse.dmri.dictionary import FingerprintDictionary
from bioinverse.dmri.fingerprint import Fingerprinting
from bioinverse.dmri.io import read_nifti, write_dwi, write_mask
from bioinverse.dmri.pgse import PGSEProtocol, hcp_mgh_protocol, read_scheme, write_scheme


def _run(args):
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code or 0
    return 0


def _image(path):
    return read_nifti(path)[0]


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """HCP MGH scheme, 12 noise-free crossing voxels on a 3×2×2 grid, the analytic dictionary."""
    root = tmp_path_factory.mktemp("micro")
    assert _run(["dmri", "scheme", "--hcp-mgh", root / "hcp.scheme"]) == 0
    assert _run(["dmri", "crossings", root / "x", "--scheme", root / "hcp.scheme", "--shape", "3,2,2",
                 "--snr", "inf", "--seed", "3"]) == 0
    assert _run(["dmri", "dictionary", "build", root / "dict.npz", "--scheme", root / "hcp.scheme"]) == 0
    return root


def _truth(x, name):
    return _image(x / f"{name}.nii.gz")


def test_scheme_writes_the_hcp_protocol_and_prints_its_shells(data, capsys):
    assert read_scheme(data / "hcp.scheme").digest() == hcp_mgh_protocol().digest()
    capsys.readouterr()
    assert _run(["dmri", "scheme", data / "hcp.scheme"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "552 measurements" in lines[0]
    rows = [line.split() for line in lines[2:7]]
    assert [round(float(r[0])) for r in rows] == [0, 1000, 3000, 5000, 10000]
    assert [int(r[4]) for r in rows] == [40, 64, 64, 128, 256]
    assert [float(r[2]) for r in rows] == [12.9] * 5 and [float(r[3]) for r in rows] == [21.8] * 5


def test_crossings_writes_consistent_images(data, tmp_path):
    x = data / "x"
    dwi = _image(x / "dwi.nii.gz")
    assert dwi.shape == (3, 2, 2, 552)
    assert np.allclose(dwi[..., :40], 1.0)  # noise-free, S(b=0) = 1
    assert (x / "protocol.scheme").read_bytes() == (data / "hcp.scheme").read_bytes()
    peaks = _image(x / "peaks.nii.gz").reshape(-1, 2, 3)
    assert np.allclose(np.linalg.norm(peaks, axis=2), 1.0, atol=1e-6)
    nu, radius, density = (_truth(x, n).reshape(-1, 2) for n in ("nu", "radius", "density"))
    assert np.allclose(nu.sum(axis=1), 1.0, atol=1e-6)
    assert ((radius >= 0.25) & (radius <= 2.23)).all() and ((density >= 0.1) & (density <= 0.76)).all()
    # a line of voxels by default, and Rician noise at a finite SNR
    assert _run(["dmri", "crossings", tmp_path / "line", "--scheme", data / "hcp.scheme", "--voxels", "5",
                 "--snr", "25"]) == 0
    noisy = _image(tmp_path / "line" / "dwi.nii.gz")
    assert noisy.shape == (5, 1, 1, 552) and _image(tmp_path / "line" / "nu.nii.gz").shape == (5, 1, 1, 2)
    assert 0.01 < np.std(noisy[..., :40]) < 0.1


def test_fingerprint_recovers_noise_free_parameters(data):
    x, out = data / "x", data / "fp"
    assert _run(["dmri", "fingerprint", x / "dwi.nii.gz", "--scheme", x / "protocol.scheme", "--dictionary",
                 data / "dict.npz", "--peaks", x / "peaks.nii.gz", "--out", out]) == 0
    # ν and f are well determined by the signal; r only loosely (the seed's Fig. 3), and the grid
    # steps are 0.06 µm, 0.03 and 0.5°
    for name, tolerance in (("nu", 0.05), ("density", 0.05), ("radius", 0.4)):
        estimate, truth = _image(out / f"{name}.nii.gz"), _truth(x, name)
        assert estimate.shape == (3, 2, 2, 2)
        assert np.median(np.abs(estimate - truth)) < tolerance, name
    # the maps are the library's estimates, voxel for voxel and population for population
    signals = _image(x / "dwi.nii.gz").reshape(-1, 552)
    orientations = _image(x / "peaks.nii.gz").reshape(-1, 2, 3)
    direct = Fingerprinting(FingerprintDictionary.load(data / "dict.npz"), read_scheme(x / "protocol.scheme"))
    expected = direct.fit().predict(signals, orientations)
    for name in ("nu", "radius", "density"):
        assert np.allclose(_image(out / f"{name}.nii.gz").reshape(-1, 2), getattr(expected, name), atol=1e-6)


def test_fingerprint_estimates_orientations_by_csd_inside_the_mask(data, tmp_path, capsys):
    x = data / "x"
    mask = np.zeros((3, 2, 2), bool)
    mask[:2] = True
    write_mask(tmp_path / "mask.nii.gz", mask, np.eye(4))
    assert _run(["dmri", "peaks", x / "dwi.nii.gz", "--scheme", x / "protocol.scheme", "--out",
                 tmp_path / "csd.nii.gz", "--mask", tmp_path / "mask.nii.gz"]) == 0
    csd = _image(tmp_path / "csd.nii.gz")
    assert csd.shape == (3, 2, 2, 6) and not csd[2].any()
    true = _image(x / "peaks.nii.gz")[mask].reshape(-1, 2, 3)
    est = csd[mask].reshape(-1, 2, 3)
    # sign-invariant angle of each estimated peak to the nearest true one
    cos = np.abs(np.einsum("vkc,vjc->vkj", est, true)).max(axis=2)
    assert np.median(np.degrees(np.arccos(np.clip(cos, 0, 1)))) < 10

    out = tmp_path / "fp"
    assert _run(["dmri", "fingerprint", x / "dwi.nii.gz", "--scheme", x / "protocol.scheme", "--dictionary",
                 data / "dict.npz", "--mask", tmp_path / "mask.nii.gz", "--out", out]) == 0
    assert np.allclose(_image(out / "peaks.nii.gz"), csd)
    nu = _image(out / "nu.nii.gz")
    assert nu.shape == (3, 2, 2, 2) and not nu[2].any()
    assert np.allclose(nu[mask].sum(axis=1), 1.0, atol=0.1)


def test_dictionary_build_is_cached_and_resumes_after_an_interrupt(data, tmp_path, capsys, monkeypatch):
    scheme = data / "hcp.scheme"
    capsys.readouterr()
    assert _run(["dmri", "dictionary", "build", data / "dict.npz", "--scheme", scheme]) == 0
    assert "already holds this dictionary" in capsys.readouterr().out
    assert _run(["dmri", "dictionary", "build", data / "dict.npz", "--scheme", scheme, "--grid", "3,2"]) == 2
    _one_line_error(capsys, "dict.npz", "--overwrite")
    shutil.copy(data / "dict.npz", tmp_path / "small.npz")
    assert _run(["dmri", "dictionary", "build", tmp_path / "small.npz", "--scheme", scheme, "--grid", "3,2",
                 "--angles", "11", "--overwrite"]) == 0
    assert "built 6 atoms × 5 shells × 11 angles (analytic)" in capsys.readouterr().out

    # The Monte Carlo simulator is replaced by a stand-in that records its settings and is
    # interrupted (Ctrl-C) at the second atom: the command must keep the first and resume from it.
    from bioinverse.dmri import montecarlo

    calls = []

    @functools.wraps(montecarlo.pack_cylinders)  # the build reads the settings from the signatures
    def pack(mean_radius, density, **kwargs):
        return mean_radius

    @functools.wraps(montecarlo.simulate_fingerprint)
    def simulate(substrate, shells, angles, **kwargs):
        calls.append(kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.full((len(shells), len(angles)), substrate / 10)

    monkeypatch.setattr(montecarlo, "pack_cylinders", pack)
    monkeypatch.setattr(montecarlo, "simulate_fingerprint", simulate)
    mc = ["dmri", "dictionary", "build", tmp_path / "mc.npz", "--scheme", scheme, "--generator", "montecarlo",
          "--grid", "2,1", "--walkers", "100", "--steps", "20", "--angles", "3"]
    assert _run(mc) == 130
    assert "1 of 2 atoms are saved" in capsys.readouterr().err
    assert _run(mc) == 0
    captured = capsys.readouterr()
    assert "resuming" in captured.err and "1 of 2 atoms done" in captured.err
    assert "built 2 atoms × 5 shells × 3 angles (montecarlo)" in captured.out
    assert len(calls) == 3 and all(c["n_walkers"] == 100 and c["n_steps"] == 20 for c in calls)
    built = FingerprintDictionary.load(tmp_path / "mc.npz")
    assert np.allclose(built.signals, np.array([0.025, 0.223])[:, None, None])


def test_hybrid_train_predict_and_transfer(data, other_protocol, tmp_path, capsys):
    x, h, model, small = data / "x", other_protocol, tmp_path / "hybrid.pt", tmp_path / "small.npz"
    assert _run(["dmri", "dictionary", "build", small, "--scheme", x / "protocol.scheme", "--grid", "4,3",
                 "--angles", "31"]) == 0
    assert _run(["dmri", "hybrid", "train", model, "--scheme", x / "protocol.scheme", "--dictionary", small,
                 "--samples", "100", "--snr", "50,inf", "--epochs", "2", "--branch-hidden", "8",
                 "--head-hidden", "8"]) == 0
    out = tmp_path / "pred"
    assert _run(["dmri", "hybrid", "predict", x / "dwi.nii.gz", "--scheme", x / "protocol.scheme", "--model",
                 model, "--peaks", x / "peaks.nii.gz", "--out", out]) == 0
    nu = _image(out / "nu.nii.gz")
    assert nu.shape == (3, 2, 2, 2) and np.allclose(nu.sum(axis=3), 1.0, atol=1e-6)
    radius, density = _image(out / "radius.nii.gz"), _image(out / "density.nii.gz")
    assert radius.shape == density.shape == (3, 2, 2, 2)
    assert ((radius >= 0.25 - 1e-6) & (radius <= 2.23 + 1e-6)).all()

    # another protocol: refused, unless transferred with a dictionary of the same atoms for it
    capsys.readouterr()
    other = [h / "dwi.nii.gz", "--scheme", h / "protocol.scheme", "--model", model, "--peaks",
             h / "peaks.nii.gz", "--out", tmp_path / "moved"]
    assert _run(["dmri", "hybrid", "predict", *other]) == 2
    _one_line_error(capsys, "hybrid.pt", "--transfer")
    assert _run(["dmri", "hybrid", "predict", *other, "--dictionary", small, "--transfer"]) == 0
    assert _image(tmp_path / "moved" / "nu.nii.gz").shape == (4, 1, 1, 2)
    capsys.readouterr()
    assert _run(["dmri", "hybrid", "predict", *other, "--dictionary", data / "dict.npz", "--transfer"]) == 2
    _one_line_error(capsys, "dict.npz", "atom grid")


@pytest.fixture(scope="module")
def other_protocol(data):
    """A 276-measurement protocol (every other measurement of the HCP one) with its own voxels."""
    write_scheme(data / "half.scheme", hcp_mgh_protocol().subset(np.arange(0, 552, 2)))
    assert _run(["dmri", "crossings", data / "half", "--scheme", data / "half.scheme", "--voxels", "4",
                 "--snr", "50"]) == 0
    return data / "half"


def test_learned_train_predict_and_refuse_another_protocol(data, other_protocol, tmp_path, capsys):
    x, model = data / "x", tmp_path / "learned.pt"
    assert _run(["dmri", "learned", "train", model, "--scheme", x / "protocol.scheme", "--samples", "300",
                 "--snr", "25,50,100", "--epochs", "2", "--hidden", "32,32"]) == 0
    out = tmp_path / "pred"
    assert _run(["dmri", "learned", "predict", x / "dwi.nii.gz", "--scheme", x / "protocol.scheme", "--model",
                 model, "--out", out]) == 0
    nu = _image(out / "nu.nii.gz")
    assert nu.shape == (3, 2, 2, 2) and (nu[..., 0] >= nu[..., 1]).all()
    assert _image(out / "radius.nii.gz").shape == (3, 2, 2, 2)
    capsys.readouterr()
    h = other_protocol
    assert _run(["dmri", "learned", "predict", h / "dwi.nii.gz", "--scheme", h / "protocol.scheme", "--model",
                 model, "--out", tmp_path / "other"]) == 2
    _one_line_error(capsys, "learned.pt", "another protocol")
    assert not (tmp_path / "other" / "nu.nii.gz").exists()


def test_bad_inputs_print_one_line_and_exit_2(data, other_protocol, tmp_path, capsys):
    x, h = data / "x", other_protocol
    fp = ["dmri", "fingerprint", x / "dwi.nii.gz", "--scheme", x / "protocol.scheme", "--dictionary",
          data / "dict.npz", "--out", tmp_path / "o"]
    capsys.readouterr()
    # the DWI has 552 volumes, the scheme 276
    assert _run(["dmri", "fingerprint", x / "dwi.nii.gz", "--scheme", h / "protocol.scheme", "--dictionary",
                 data / "dict.npz", "--peaks", x / "peaks.nii.gz", "--out", tmp_path / "o"]) == 2
    _one_line_error(capsys, "dwi.nii.gz", "552 volumes", "276 measurements")
    # peaks on another grid, and a zero peak
    assert _run([*fp, "--peaks", h / "peaks.nii.gz"]) == 2
    _one_line_error(capsys, "peaks.nii.gz", "4×1×1×6", "3×2×2×6")
    peaks = _image(x / "peaks.nii.gz")
    peaks[1, 0, 1, 3:] = 0
    write_dwi(tmp_path / "zero.nii.gz", peaks, np.eye(4))
    assert _run([*fp, "--peaks", tmp_path / "zero.nii.gz"]) == 2
    _one_line_error(capsys, "zero.nii.gz", "peak 2 of voxel (1, 0, 1)")
    # a malformed scheme line
    lines = (data / "hcp.scheme").read_text().splitlines()
    lines[5] = "1 0 0 0.1"
    (tmp_path / "bad.scheme").write_text("\n".join(lines) + "\n")
    assert _run(["dmri", "scheme", tmp_path / "bad.scheme"]) == 2
    _one_line_error(capsys, "bad.scheme", "line 6")
    # options
    assert _run(["dmri", "crossings", tmp_path / "c", "--scheme", data / "hcp.scheme", "--shape", "2,2,2",
                 "--voxels", "5"]) == 2
    _one_line_error(capsys, "--voxels")
    assert _run(["dmri", "dictionary", "build", tmp_path / "d.npz", "--scheme", data / "hcp.scheme",
                 "--walkers", "10"]) == 2
    _one_line_error(capsys, "--walkers", "montecarlo")
    assert _run(["dmri", "learned", "train", tmp_path / "m.pt", "--scheme", data / "hcp.scheme", "--snr",
                 "25,-1"]) == 2
    _one_line_error(capsys, "--snr")
    # a dictionary without the shells of the scheme
    write_scheme(tmp_path / "b2000.scheme",
                 PGSEProtocol([[0, 0, 0], [1, 0, 0]], [0.0, 100.0], 12.9, 21.8, 57.0))
    write_dwi(tmp_path / "two.nii.gz", np.ones((1, 1, 1, 2)), np.eye(4))
    assert _run(["dmri", "fingerprint", tmp_path / "two.nii.gz", "--scheme", tmp_path / "b2000.scheme",
                 "--dictionary", data / "dict.npz", "--out", tmp_path / "o"]) == 2
    _one_line_error(capsys, "dict.npz", "b2000.scheme")
    assert not (tmp_path / "o" / "nu.nii.gz").exists()
