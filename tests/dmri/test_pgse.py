"""PGSE protocols and Camino scheme files."""

import re

import numpy as np
import pytest

from bioinverse.dmri.io import b_from_gradient
from bioinverse.dmri.pgse import GAMMA_UM, PGSEProtocol, hcp_mgh_protocol, read_scheme, write_scheme
from bioinverse.errors import InputError


def test_b_and_q_follow_stejskal_tanner():
    G = np.array([0.0, 40.0, 80.0, 219.0])
    p = PGSEProtocol(np.tile([0.0, 0.0, 1.0], (4, 1)), G, 12.9, 21.8, 57.0)
    np.testing.assert_allclose(p.bvals, b_from_gradient(G, 12.9, 21.8), rtol=1e-12)
    np.testing.assert_allclose(p.q, GAMMA_UM * G * 12.9)


def test_hcp_mgh_protocol_matches_the_published_design():
    p = hcp_mgh_protocol()
    assert len(p) == 552
    shells, shell_of = p.shell_table()
    b = PGSEProtocol(np.tile([1.0, 0, 0], (len(shells), 1)), shells[:, 0], shells[:, 1], shells[:, 2], 57.0).bvals
    np.testing.assert_allclose(b, [0, 1000, 3000, 5000, 10000], atol=1e-6)
    assert np.bincount(shell_of).tolist() == [40, 64, 64, 128, 256]
    assert np.all(p.small_delta == 12.9) and np.all(p.big_delta == 21.8)
    weighted = p.directions[~p.b0s_mask]
    np.testing.assert_allclose(np.linalg.norm(weighted, axis=1), 1.0)


def test_scheme_round_trip_is_exact(tmp_path):
    p = hcp_mgh_protocol()
    path = write_scheme(tmp_path / "hcp.scheme", p)
    assert path.read_text().startswith("VERSION: STEJSKALTANNER\n")
    q = read_scheme(path)
    assert q.digest() == p.digest()
    np.testing.assert_allclose(q.bvals, p.bvals, rtol=1e-12)


def test_scheme_reader_skips_comments_and_converts_si_units(tmp_path):
    f = tmp_path / "a.scheme"
    f.write_text("# made by hand\n\nVERSION: STEJSKALTANNER\n0 0 0 0 0.0218 0.0129 0.057  # b0\n"
                 "0 1 0 0.1 0.0218 0.0129 0.057\n")
    p = read_scheme(f)
    assert p.gradient_strength.tolist() == [0.0, 100.0]
    assert p.small_delta.tolist() == [12.9, 12.9] and p.big_delta.tolist() == [21.8, 21.8]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("VERSION: BVECTOR\n1 0 0 1000\n", "expected 'VERSION: STEJSKALTANNER'"),
        ("VERSION: STEJSKALTANNER\n", "no measurements"),
        ("VERSION: STEJSKALTANNER\n1 0 0 0.04 0.04 0.02\n", "line 2: expected 7 numbers"),
        ("VERSION: STEJSKALTANNER\n1 0 0 0.04 0.04 0.02 0.08 9\n", "line 2: expected 7 numbers"),
        ("VERSION: STEJSKALTANNER\n1 0 0 0.04 x 0.02 0.08\n", "line 2: not a number"),
        ("VERSION: STEJSKALTANNER\n1 0 0 nan 0.04 0.02 0.08\n", "NaN or Inf"),
        ("VERSION: STEJSKALTANNER\n1 0 0 40 0.04 0.02 0.08\n", "SI units (T/m, s)"),
        ("VERSION: STEJSKALTANNER\n1 0 0 0.04 40 20 80\n", "SI units (s)"),
        ("VERSION: STEJSKALTANNER\n0.5 0 0 0.04 0.04 0.02 0.08\n", "norm 0.500"),
        ("VERSION: STEJSKALTANNER\n1 0 0 0.04 0.01 0.02 0.08\n", "Δ must be ≥ δ"),
        ("VERSION: STEJSKALTANNER\n1 0 0 0.04 0.04 0.02 0.03\n", "TE must be ≥ Δ + δ"),
        ("VERSION: STEJSKALTANNER\n1 0 0 -0.04 0.04 0.02 0.08\n", "≥ 0 mT/m"),
    ],
)
def test_scheme_reader_rejects_malformed_files(tmp_path, text, message):
    f = tmp_path / "bad.scheme"
    f.write_text(text)
    with pytest.raises(InputError, match=re.escape(message)) as info:
        read_scheme(f)
    assert str(f) in str(info.value)


def test_missing_scheme_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_scheme(tmp_path / "none.scheme")


def test_subset_shell_table_and_gradient_table():
    p = hcp_mgh_protocol()
    without_top = p.subset(p.bvals < 9000)
    assert len(without_top) == 296
    assert without_top.shell_table()[0].shape == (4, 3)
    gtab = without_top.gradient_table()
    np.testing.assert_allclose(gtab.bvals, without_top.bvals)
    assert gtab.small_delta == 12.9 and gtab.big_delta == 21.8 and gtab.echo_time == 57.0
    assert without_top.digest() != p.digest()
    with pytest.raises(InputError, match="boolean mask"):
        p.subset(np.ones(3, dtype=bool))


def test_protocol_rejects_bad_arrays():
    with pytest.raises(InputError, match="shape"):
        PGSEProtocol(np.zeros((3, 2)), 0.0, 10.0, 20.0, 40.0)
    with pytest.raises(InputError, match="gradient_strength must have shape"):
        PGSEProtocol(np.zeros((3, 3)), [0.0, 1.0], 10.0, 20.0, 40.0)
    with pytest.raises(InputError, match="NaN or Inf"):
        PGSEProtocol(np.zeros((1, 3)), 0.0, np.nan, 20.0, 40.0)
