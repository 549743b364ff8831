"""FSC tables in STAR files: write_fsc_star / read_fsc_star, against hand-written and RELION-written tables."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from bioinverse.cryoem.io import read_fsc_star, write_fsc_star, write_map
from bioinverse.cryoem.refine import soft_sphere_mask
from bioinverse.errors import InputError
from bioinverse.fourier import FSCCurve, fsc

needs_postprocess = pytest.mark.skipif(shutil.which("relion_postprocess") is None,
                                       reason="RELION (relion_postprocess) is not installed")


def _half_maps(box=24, seed=0):
    """Two half maps: a common smooth signal plus independent white noise."""
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((box,) * 3)
    k = np.fft.fftfreq(box)
    radius2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    signal = np.fft.ifftn(np.fft.fftn(signal) * np.exp(-radius2 / (2 * 0.12**2))).real
    signal /= signal.std()
    return signal + 0.3 * rng.standard_normal(signal.shape), signal + 0.3 * rng.standard_normal(signal.shape)


def test_round_trip_of_a_computed_curve(tmp_path):
    half1, half2 = _half_maps()
    curve = fsc(half1, half2, 1.7)
    write_fsc_star(tmp_path / "fsc.star", curve)
    back = read_fsc_star(tmp_path / "fsc.star")
    assert back.pixel_size == pytest.approx(1.7, rel=1e-6)
    np.testing.assert_allclose(back.frequency, curve.frequency, rtol=1e-6)
    np.testing.assert_allclose(back.values, curve.values, atol=5e-7)  # 6 decimals, as RELION writes
    np.testing.assert_array_equal(back.n_coefficients, curve.n_coefficients)
    assert back.resolution(0.143) == pytest.approx(curve.resolution(0.143), rel=1e-4)


def test_table_layout(tmp_path):
    curve = FSCCurve([0.0, 0.125, 0.25], [1.0, 0.75, -0.05], [1, 18, 35], 2.0)
    write_fsc_star(tmp_path / "fsc.star", curve)
    text = (tmp_path / "fsc.star").read_text()
    assert "data_fsc" in text and "# version 30001" in text
    body = text.split("loop_")[1].split()
    assert body[:8] == ["_rlnSpectralIndex", "#1", "_rlnResolution", "#2", "_rlnAngstromResolution", "#3",
                        "_rlnFourierShellCorrelation", "#4"]
    rows = np.array(body[8:], dtype=float).reshape(3, 4)
    np.testing.assert_allclose(rows, [[0, 0.0, 999.0, 1.0], [1, 0.125, 8.0, 0.75], [2, 0.25, 4.0, -0.05]])


RELION_MODEL = """
# version 30001

data_model_general

_rlnReferenceDimensionality                        3
_rlnOriginalImageSize                              8

# version 30001

data_model_class_1

loop_
_rlnSpectralIndex #1
_rlnResolution #2
_rlnAngstromResolution #3
_rlnSsnrMap #4
_rlnGoldStandardFsc #5
           0     0.000000   999.000000    10.000000     1.000000
           1     0.041667    24.000000     5.000000     0.950000
           2     0.083333    12.000000     1.000000     0.600000
           3     0.125000     8.000000     0.100000     0.100000
           4     0.166667     6.000000     0.010000     0.010000

# version 30001

data_model_group_1

loop_
_rlnSpectralIndex #1
_rlnSigma2Noise #2
           0     1.000000
"""


def test_reads_relion_refine_model_star(tmp_path):
    path = tmp_path / "run_model.star"
    path.write_text(RELION_MODEL)
    curve = read_fsc_star(path)  # finds rlnGoldStandardFsc in data_model_class_1
    assert curve.pixel_size == pytest.approx(3.0)
    np.testing.assert_allclose(curve.values, [1.0, 0.95, 0.6, 0.1, 0.01])
    np.testing.assert_allclose(curve.frequency, np.arange(5) / 24.0)
    # box 8: FSC 0.143 between shell 2 (0.6) and 3 (0.1) at shell 2 + 0.457/0.5
    assert curve.resolution(0.143) == pytest.approx(24.0 / (2 + 0.457 / 0.5), rel=1e-6)
    ssnr = read_fsc_star(path, column="rlnSsnrMap")
    assert ssnr.values[1] == 5.0


def test_relion_stand_in_for_shell_zero_is_accepted(tmp_path):
    text = RELION_MODEL.replace("0     0.000000   999.000000", "0     0.001001   999.000000")
    (tmp_path / "m.star").write_text(text)
    assert read_fsc_star(tmp_path / "m.star").frequency[0] == 0.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("_rlnGoldStandardFsc", "_rlnSomethingElse"), "no table with rlnResolution"),
        (lambda t: t.replace("           1     0.041667", "           7     0.041667"), "rlnSpectralIndex"),
        # the last row's resolution (2 × pixel size at Nyquist) disagrees with the frequencies
        (lambda t: t.replace("0.166667     6.000000", "0.166667     5.000000"), "does the table end at Nyquist"),
        (lambda t: t.replace("0.083333    12.000000", "0.090000    12.000000"), "is not s / (N"),
        (lambda t: t.replace("0.950000", "n/a"), "not a number"),
    ],
)
def test_malformed_tables(tmp_path, edit, message):
    (tmp_path / "bad.star").write_text(edit(RELION_MODEL))
    with pytest.raises(InputError, match=re.escape(message)):
        read_fsc_star(tmp_path / "bad.star")


def test_other_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_fsc_star(tmp_path / "missing.star")
    with pytest.raises(InputError, match="must be an FSCCurve"):
        write_fsc_star(tmp_path / "x.star", np.ones(5))
    assert not (tmp_path / "x.star").exists()
    one_row = "data_fsc\n\nloop_\n_rlnSpectralIndex #1\n_rlnResolution #2\n_rlnFourierShellCorrelation #3\n" \
              "0 0.0 1.0\n"
    (tmp_path / "one.star").write_text(one_row)
    with pytest.raises(InputError, match="1 row"):
        read_fsc_star(tmp_path / "one.star")


@needs_postprocess
def test_reads_relion_postprocess_star(tmp_path):
    """relion_postprocess's data_fsc: its unmasked and masked FSCs agree with bioinverse.fourier.fsc.

    RELION sums over the half transform without counting Hermitian twins twice, so it weights the kx = 0
    plane differently: curves agree to a few hundredths, not exactly.
    """
    box, pixel_size = 32, 2.0
    half1, half2 = _half_maps(box, seed=3)
    mask = soft_sphere_mask(box, 11.0, 3.0)
    for name, data in (("half1.mrc", half1), ("half2.mrc", half2), ("mask.mrc", mask)):
        write_map(tmp_path / name, data, pixel_size)
    run = subprocess.run(["relion_postprocess", "--i", "half1.mrc", "--i2", "half2.mrc", "--mask", "mask.mrc",
                          "--angpix", str(pixel_size), "--o", "post", "--adhoc_bfac", "0"],
                         check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (tmp_path / "post.star").exists(), run.stdout + run.stderr
    unmasked = read_fsc_star(tmp_path / "post.star", column="rlnFourierShellCorrelationUnmaskedMaps")
    masked = read_fsc_star(tmp_path / "post.star", column="rlnFourierShellCorrelationMaskedMaps")
    corrected = read_fsc_star(tmp_path / "post.star")  # rlnFourierShellCorrelationCorrected
    assert unmasked.pixel_size == pytest.approx(pixel_size) and len(unmasked) == box // 2 + 1
    np.testing.assert_allclose(unmasked.values, fsc(half1, half2, pixel_size).values, atol=0.03)
    np.testing.assert_allclose(masked.values, fsc(half1 * mask, half2 * mask, pixel_size).values, atol=0.03)
    final = float(next(line.split()[1] for line in (tmp_path / "post.star").read_text().splitlines()
                       if line.startswith("_rlnFinalResolution")))
    # RELION quotes the shell at or after the crossing; the interpolated crossing lies within one shell
    shell_width = 1.0 / (box * pixel_size)
    assert abs(1.0 / corrected.resolution(0.143) - 1.0 / final) <= shell_width + 1e-9
