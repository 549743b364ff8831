"""RELION 3.1's --external_reconstruct: RELION's own files and results, synthetic B/K pairs, bad input, the CLI."""

import shutil
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from bioinverse.cli import main
from bioinverse.cryoem.priors import Prior
from bioinverse.cryoem.relion_external import read_external_reconstruct, reconstruct_external, run_external
from bioinverse.errors import InputError

DATA = Path(__file__).parent / "data" / "relion_external"


def _relion_files(tmp_path: Path, name: str = "map") -> Path:
    """RELION's request in a scratch folder, with relion_reconstruct's swapped τ²/FSC columns put right."""
    for f in DATA.iterdir():
        shutil.copy(f, tmp_path / f.name)
    star = tmp_path / f"{name}.star"
    text = star.read_text().replace("_rlnReferenceTau2 #2", "_rlnGoldStandardFsc #2")
    star.write_text(text.replace("_rlnGoldStandardFsc #3", "_rlnReferenceTau2 #3"))
    return star


def _relative_error(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", ["map", "unregularised"])
def test_the_gaussian_prior_reproduces_relions_reconstruction(tmp_path, name):
    star = _relion_files(tmp_path, name)
    volume, weight, _ = reconstruct_external(read_external_reconstruct(star))
    expected = mrcfile.read(DATA / f"relion_{name}.mrc")
    assert volume.shape == (12, 12, 12) and weight == 0.0
    assert _relative_error(volume, expected) < 1e-5  # float32 round-off of RELION's own files


def _blob(n: int) -> np.ndarray:
    grid = np.arange(n) - n // 2
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    blob = np.exp(-((x - 1.5) ** 2 + (y + 1) ** 2 + z**2) / 4.0) + 0.5 * np.exp(-((x + 2) ** 2 + (y - 2) ** 2 + (z - 1) ** 2) / 3.0)
    return blob.astype(np.float64)


def _synthetic(tmp_path: Path, volume: np.ndarray, k: float, tau2: float, pad: int = 2) -> Path:
    """B = K · spectrum(volume) in RELION's layout and units, K constant, τ² constant."""
    n = volume.shape[0]
    p = pad * n
    r = np.sqrt(sum(g**2 for g in np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")))
    padded = np.zeros((p, p, p))
    lo = p // 2 - n // 2
    padded[lo:lo + n, lo:lo + n, lo:lo + n] = volume * np.sinc(r / p) ** 2 * pad**3 * n  # RELION's gridding, 1/norm
    spectrum = np.fft.rfftn(np.fft.ifftshift(padded)) / p**3
    weight = np.full(spectrum.shape, k)
    numerator = spectrum * weight
    for part, values in (("real", numerator.real), ("imag", numerator.imag), ("weight", weight)):
        mrcfile.write(tmp_path / f"syn_{part}.mrc", values.astype(np.float32), overwrite=True)
    rows = "\n".join(f"{i} {tau2:.8e} {1.0 if i < n // 4 else 0.0:.6f}" for i in range(n // 2 + 1))
    star = tmp_path / "syn.star"
    star.write_text(f"""data_external_reconstruct_general

_rlnExtReconsDataReal syn_real.mrc
_rlnExtReconsDataImag syn_imag.mrc
_rlnExtReconsWeight syn_weight.mrc
_rlnExtReconsResult {tmp_path / 'syn_result.mrc'}
_rlnExtReconsResultStarfile syn_out.star
_rlnTau2FudgeFactor 1.0
_rlnPaddingFactor {pad}
_rlnReferenceDimensionality 3
_rlnOriginalImageSize {n}
_rlnCurrentImageSize {n}

data_external_reconstruct_tau2

loop_
_rlnSpectralIndex #1
_rlnReferenceTau2 #2
_rlnGoldStandardFsc #3
{rows}
""")
    return star


def test_a_synthetic_pair_round_trips_to_the_wiener_result(tmp_path):
    volume = _blob(16)
    k, tau2 = 5.0, 0.05
    job = read_external_reconstruct(_synthetic(tmp_path, volume, k, tau2))
    result, _, _ = reconstruct_external(job)
    shrink = k / (k + 1.0 / (2**3 * tau2))  # eq. 11 with RELION's τ² per padded voxel, 1/(pad³ τ²)
    assert _relative_error(result, shrink * volume) < 2e-3


class _Oracle:
    pixel_size = 2.0

    def __init__(self, truth):
        self.truth = truth
        self.calls = []

    def __call__(self, volume):
        self.calls.append(volume)
        return self.truth.astype(np.float32)


def test_red_with_a_perfect_denoiser_returns_the_truth_whatever_tau2(tmp_path):
    volume = _blob(16)
    for tau2 in (1e-4, 0.05):
        oracle = _Oracle(volume)
        job = read_external_reconstruct(_synthetic(tmp_path, volume, 5.0, tau2))
        result, weight, _ = reconstruct_external(job, Prior("red"), oracle)
        assert weight == 1.0 and _relative_error(result, volume) < 2e-3
        assert _relative_error(oracle.calls[0], volume) < 2e-3  # the denoiser saw B / K, the data alone
        gaussian, _, _ = reconstruct_external(job)
        assert _relative_error(gaussian, volume) > 0.01  # … which the Gaussian prior shrinks


def test_cwred_weight_comes_from_the_fsc_column(tmp_path):
    volume = _blob(16)
    job = read_external_reconstruct(_synthetic(tmp_path, volume, 5.0, 0.05))
    # FSC 1 up to shell 3, 0 from shell 4: nominal resolution 16 · 2 Å / ~3.86 ≈ 8.3 Å → λ ≈ 0.31
    _, weight, resolution = reconstruct_external(job, Prior("cwred"), _Oracle(volume))
    assert 8.0 < resolution < 8.6 and weight == pytest.approx((10 - resolution) / 5.5)
    _, zero, _ = reconstruct_external(job, Prior("cwred", low_resolution=8.0, high_resolution=4.0), _Oracle(volume))
    assert zero == 0.0
    with pytest.raises(InputError, match="--apix"):
        reconstruct_external(job, Prior("cwred"), lambda v: v)  # no pixel size anywhere


def test_bad_requests_are_rejected_with_the_file_named(tmp_path):
    star = _synthetic(tmp_path, _blob(16), 5.0, 0.05)
    weight = mrcfile.read(tmp_path / "syn_weight.mrc")
    mrcfile.write(tmp_path / "syn_weight.mrc", weight[:, :, :-1], overwrite=True)
    with pytest.raises(InputError, match="syn_weight.mrc"):
        read_external_reconstruct(star)
    bad = weight.copy()
    bad[0, 0, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns about the NaN it is asked to write
        mrcfile.write(tmp_path / "syn_weight.mrc", bad, overwrite=True)
    with pytest.raises(InputError, match="NaN"):
        read_external_reconstruct(star)
    mrcfile.write(tmp_path / "syn_weight.mrc", -weight, overwrite=True)
    with pytest.raises(InputError, match="negative"):
        read_external_reconstruct(star)
    mrcfile.write(tmp_path / "syn_weight.mrc", weight, overwrite=True)
    text = star.read_text()
    star.write_text(text.replace("_rlnExtReconsWeight syn_weight.mrc\n", ""))
    with pytest.raises(InputError, match="rlnExtReconsWeight"):
        read_external_reconstruct(star)
    star.write_text(text.replace("_rlnPaddingFactor 2", "_rlnPaddingFactor 3"))
    with pytest.raises(InputError, match="padding"):
        read_external_reconstruct(star)
    star.write_text("data_other\n\n_rlnFoo 1\n")
    with pytest.raises(InputError, match="external-reconstruct"):
        read_external_reconstruct(star)


def test_the_command_writes_the_map_relion_waits_for(tmp_path, monkeypatch, capsys):
    star = _relion_files(tmp_path)
    work = tmp_path / "relion_cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # RELION's working directory: the result path is relative to it
    with pytest.raises(SystemExit) as done:
        main(["cryoem", "relion-external", "--prior", "gaussian", str(star)])
    assert done.value.code == 0
    result = mrcfile.read(work / "result.mrc")
    assert _relative_error(result, mrcfile.read(DATA / "relion_map.mrc")) < 1e-5
    assert not list(work.glob("*.tmp*"))
    info = run_external(star)
    assert info["weight"] == 0.0 and info["result"] == "result.mrc"
    with pytest.raises(SystemExit) as failed:
        main(["cryoem", "relion-external", "--prior", "gaussian", str(tmp_path / "missing.star")])
    assert failed.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")
