import hashlib
import io
import subprocess
import tarfile

import numpy as np
import pytest

from bioinverse.cryoem import structures
from bioinverse.cryoem.io import read_atoms
from bioinverse.cryoem.structures import (
    FetchError,
    available_structures,
    default_cache,
    fetch_structure,
    structure_member,
)
from bioinverse.errors import InputError

PREFIX = "mdanalysistests-2.11.0/MDAnalysisTests/data/"

PDB_LINE = "ATOM      1  CA  GLY A   1       1.000   2.000   3.000  1.00 20.00           C\nEND\n"


def test_names_map_to_archive_members():
    assert structure_member("adk_open") == PREFIX + "adk_open.pdb"
    assert structure_member("4E43") == PREFIX + "4E43.pdb"
    assert structure_member("4e43") == PREFIX + "4E43.pdb"
    assert structure_member("1hvr") == PREFIX + "1hvr.pdb"
    assert structure_member("1hvr.pdb") == PREFIX + "1hvr.pdb"
    assert structure_member("dssp/1ahsA") == PREFIX + "dssp/1ahsA.pdb.gz"
    assert structure_member("mmcif/5PTI") == PREFIX + "mmcif/5PTI.cif.gz"
    assert structure_member("19hc") == PREFIX + "19hc.pdb.gz"
    names = available_structures()
    assert len(names) == len(set(names)) > 50
    assert all(structure_member(n).startswith(PREFIX) for n in names)


@pytest.mark.parametrize("name", ["adk_half_open", "dssp/wrong_hydrogens", "CONECT2TER", "", "../etc/passwd"])
def test_unknown_name_is_an_input_error_listing_valid_ones(name):
    with pytest.raises(InputError, match="adk_open.*4E43.*dssp/1ahsA"):
        structure_member(name)
    with pytest.raises(InputError):
        fetch_structure(name)


def test_cache_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BIOINVERSE_CACHE", str(tmp_path))
    assert default_cache() == tmp_path / "structures"
    monkeypatch.delenv("BIOINVERSE_CACHE")
    assert default_cache().parts[-3:] == (".cache", "bioinverse", "structures")


def fake_sdist(path):
    """A small archive with the real sdist's layout and name."""
    with tarfile.open(path, "w:gz") as archive:
        for member, text in ((PREFIX + "adk_open.pdb", PDB_LINE), (PREFIX + "1hvr.pdb", PDB_LINE)):
            data = text.encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_extracts_only_the_requested_member_from_a_cached_archive(monkeypatch, tmp_path):
    digest = fake_sdist(tmp_path / structures._SDIST)
    monkeypatch.setattr(structures, "_SDIST_SHA256", digest)

    def no_network(*args, **kwargs):
        raise AssertionError("a verified cached archive must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_network)
    path = fetch_structure("adk_open", cache=tmp_path)
    assert path == tmp_path / "MDAnalysisTests-2.11.0" / "adk_open.pdb"
    assert path.read_text() == PDB_LINE
    assert not (tmp_path / "MDAnalysisTests-2.11.0" / "1hvr.pdb").exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
    # Once extracted, the archive is no longer needed.
    (tmp_path / structures._SDIST).unlink()
    assert fetch_structure("adk_open", cache=tmp_path) == path
    assert read_atoms(path).positions.tolist() == [[1.0, 2.0, 3.0]]


def test_failed_download_is_a_clear_error_and_leaves_no_archive(monkeypatch, tmp_path):
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies "
                                                            "the requirement MDAnalysisTests==2.11.0")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(FetchError, match="pip could not download.*no network"):
        fetch_structure("adk_open", cache=tmp_path)
    assert not (tmp_path / structures._SDIST).exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_corrupt_archive_in_cache_is_downloaded_again(monkeypatch, tmp_path):
    (tmp_path / structures._SDIST).write_bytes(b"truncated")
    calls = []

    def offline(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "network unreachable")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(FetchError, match="network unreachable"):
        fetch_structure("1hvr", cache=tmp_path)
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "MDAnalysisTests==2.11.0" in calls[0]


@pytest.fixture(scope="module")
def adk_open_path():
    try:
        return fetch_structure("adk_open")
    except FetchError as exc:
        pytest.skip(f"MDAnalysisTests sdist not reachable: {exc}")


def test_real_adk_open_has_the_expected_atoms(adk_open_path):
    atoms = read_atoms(adk_open_path)
    assert abs(len(atoms) - 3341) <= 5
    assert set(np.unique(atoms.elements)) <= {"C", "H", "N", "O", "S"}
    assert {"C", "N", "O", "S"} <= set(np.unique(atoms.elements))
    extent = atoms.positions.max(0) - atoms.positions.min(0)
    assert (extent > 30).all() and (extent < 90).all()  # Å; a 214-residue kinase
