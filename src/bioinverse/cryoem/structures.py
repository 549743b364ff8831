"""Real protein models for simulations: the structures shipped in the ``MDAnalysisTests`` source distribution.

The PyPI sdist of MDAnalysisTests (pinned to :data:`MDANALYSISTESTS_VERSION`) carries some fifty real
protein structures from the PDB: adenylate kinase in its open and closed forms (``adk_open``,
``adk_closed``, 214 residues, 3341 atoms with hydrogens), two HIV-1 protease dimers (``4E43``, ``1hvr``),
single chains of 80–180 residues (``dssp/1ahsA`` …) and a few mmCIF files (``mmcif/5PTI`` …).
:func:`fetch_structure` downloads the archive once with pip (the registry's ordinary client), checks its
SHA-256, and extracts only the file asked for into a cache folder; later calls, also offline, read the cache.

The cache folder is ``~/.cache/bioinverse/structures`` unless the environment variable ``BIOINVERSE_CACHE``
names another one (the structures then go to ``$BIOINVERSE_CACHE/structures``) or the caller passes one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bioinverse.errors import BioinverseError, InputError
from bioinverse.io import write_bytes

__all__ = ["MDANALYSISTESTS_VERSION", "FetchError", "available_structures", "clear_cache", "default_cache",
           "fetch_structure", "structure_member"]

#: The MDAnalysisTests release whose sdist is read.
MDANALYSISTESTS_VERSION = "2.11.0"
_SDIST = f"mdanalysistests-{MDANALYSISTESTS_VERSION}.tar.gz"
_SDIST_SHA256 = "5edeb5b01805da728b202103aa8d2b5974a37f1005ab1fe0150ed7d59702d2ea"
_DATA_PREFIX = f"mdanalysistests-{MDANALYSISTESTS_VERSION}/MDAnalysisTests/data/"

# Name → file under MDAnalysisTests/data/. Only real macromolecular models; the package's parser
# fixtures (broken CONECT records, random walks, water boxes, …) are left out.
_TOP_LEVEL = {
    "adk_open": "adk_open.pdb",  # adenylate kinase, open (from 4AKE), with hydrogens
    "adk_closed": "adk_closed.pdb",  # adenylate kinase, closed (from 1AKE), with hydrogens
    "4E43": "4E43.pdb",  # HIV-1 protease dimer
    "1hvr": "1hvr.pdb",  # HIV-1 protease dimer with a cyclic urea inhibitor
    "1a28": "1a28.pdb.gz",  # progesterone receptor ligand-binding domain
    "19hc": "19hc.pdb.gz",  # nine-haem cytochrome c
    "1osm": "1osm.pdb.gz",  # osmoporin OmpK36
    "5a7u": "5a7u.pdb",  # ADR1 domain in the ribosome tunnel (cryo-EM model)
}
_DSSP_CHAINS = (
    "1ahsA", "1bvyF", "1dx5I", "1eteA", "1h4aX", "1i8nA", "1lpbA", "1mr1D", "1or4A", "1pdoA", "1v7mV", "1y1lA",
    "2a2lA", "2cayA", "2cviA", "2fvvA", "2gu3A", "2i39A", "2j49A", "2qdlA", "2va0A", "2xcjA", "2xdgA", "2xr6A",
    "3a4rA", "3aqgA", "3e8mA", "3ejfA", "3fhkA", "3gfsA", "3gknA", "3gwiA", "3hklA", "3ieyB", "3ii2A", "3k7pA",
    "3l4rA", "3lqcA", "3nbkA", "3nngA", "3ny7A", "3nzmA", "3on9A", "3pivA", "3q4oA", "3so6A", "3t5gB", "3vjzA",
    "4dkcA", "4gcnA",
)
_MMCIF = ("1BD2", "3KPR", "3PWP", "5PTI")

_CATALOGUE = {
    **_TOP_LEVEL,
    **{f"dssp/{c}": f"dssp/{c}.pdb.gz" for c in _DSSP_CHAINS},
    **{f"mmcif/{c}": f"mmcif/{c}.cif.gz" for c in _MMCIF},
}


class FetchError(BioinverseError, OSError):
    """The structure archive could not be downloaded or read (no network, no pip, a corrupt download)."""


def available_structures() -> list[str]:
    """Names accepted by :func:`fetch_structure`, sorted.

    Examples
    --------
    >>> names = available_structures()
    >>> "adk_open" in names, "dssp/1ahsA" in names, len(names) > 50
    (True, True, True)
    """
    return sorted(_CATALOGUE, key=str.lower)


def structure_member(name: str) -> str:
    """The archive member (path inside the sdist) that holds the structure ``name``.

    Parameters
    ----------
    name : str
        A name of :func:`available_structures` (``"adk_open"``, ``"4E43"``, ``"dssp/1ahsA"``); the case of
        the letters does not matter, and a trailing file extension (``"adk_open.pdb"``) is accepted.

    Returns
    -------
    str

    Raises
    ------
    InputError
        An unknown name; the message lists some valid ones.

    Examples
    --------
    >>> structure_member("adk_open")
    'mdanalysistests-2.11.0/MDAnalysisTests/data/adk_open.pdb'
    >>> structure_member("dssp/1AHSA")
    'mdanalysistests-2.11.0/MDAnalysisTests/data/dssp/1ahsA.pdb.gz'
    """
    if not isinstance(name, str):
        raise InputError("name", f"must be a string such as 'adk_open', got {type(name).__name__}")
    key = name.strip().replace("\\", "/")
    for extension in (".pdb.gz", ".cif.gz", ".pdb", ".cif"):
        if key.lower().endswith(extension):
            key = key[: -len(extension)]
            break
    by_lower = {k.lower(): k for k in _CATALOGUE}
    if key.lower() not in by_lower:
        examples = "adk_open, adk_closed, 4E43, 1hvr, dssp/1ahsA, mmcif/5PTI"
        raise InputError("name", f"{name!r} is not a structure of MDAnalysisTests {MDANALYSISTESTS_VERSION}; "
                         f"valid names include {examples} ({len(_CATALOGUE)} in all, see available_structures())")
    return _DATA_PREFIX + _CATALOGUE[by_lower[key.lower()]]


def default_cache() -> Path:
    """The structures' cache folder: ``$BIOINVERSE_CACHE/structures`` or ``~/.cache/bioinverse/structures``.

    Examples
    --------
    >>> default_cache().name
    'structures'
    """
    root = os.environ.get("BIOINVERSE_CACHE")
    return Path(root) / "structures" if root else Path.home() / ".cache" / "bioinverse" / "structures"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_sdist(cache: Path) -> Path:
    """The verified sdist in ``cache``, downloaded with pip unless a good copy is there already."""
    sdist = cache / _SDIST
    if sdist.is_file() and _sha256(sdist) == _SDIST_SHA256:
        return sdist
    cache.mkdir(parents=True, exist_ok=True)
    # pip writes into a private folder that is renamed into place only when complete and verified, so a
    # concurrent or interrupted fetch never leaves a partial archive under the final name.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "--quiet", f"MDAnalysisTests=={MDANALYSISTESTS_VERSION}",
                   "-d", tmp]
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FetchError(f"could not run pip to download MDAnalysisTests {MDANALYSISTESTS_VERSION} "
                             f"({exc})") from None
        if done.returncode != 0:
            tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise FetchError(f"pip could not download the MDAnalysisTests {MDANALYSISTESTS_VERSION} sdist (no "
                             f"network or no package index?): {tail or f'exit status {done.returncode}'}")
        found = Path(tmp) / _SDIST
        if not found.is_file():
            raise FetchError(f"pip finished but left no {_SDIST} in {tmp}")
        checksum = _sha256(found)
        if checksum != _SDIST_SHA256:
            raise FetchError(f"the downloaded {_SDIST} has SHA-256 {checksum}, expected {_SDIST_SHA256}")
        os.replace(found, sdist)
    return sdist


def fetch_structure(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Path of a real protein structure file, downloaded and extracted on first use.

    Parameters
    ----------
    name : str
        A name of :func:`available_structures`: ``"adk_open"``, ``"adk_closed"``, ``"4E43"``, ``"1hvr"``,
        ``"dssp/1ahsA"``, ``"mmcif/5PTI"``, …
    cache : path, optional
        Folder for the archive and the extracted files (default :func:`default_cache`).

    Returns
    -------
    pathlib.Path
        The extracted file (``.pdb``, ``.pdb.gz`` or ``.cif.gz``), readable by
        :func:`bioinverse.cryoem.io.read_atoms`.

    Raises
    ------
    InputError
        An unknown name.
    FetchError
        The archive is not cached and cannot be downloaded, or is unreadable.

    Examples
    --------
    >>> path = fetch_structure("adk_open")  # doctest: +SKIP
    >>> len(read_atoms(path))  # doctest: +SKIP
    3341
    """
    member = structure_member(name)
    cache = Path(cache) if cache is not None else default_cache()
    relative = member[len(_DATA_PREFIX):]
    target = cache / f"MDAnalysisTests-{MDANALYSISTESTS_VERSION}" / relative
    if target.is_file():
        return target
    sdist = _download_sdist(cache)
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            handle = archive.extractfile(member)
            if handle is None:
                raise FetchError(f"{sdist} holds {member} but not as a regular file")
            data = handle.read()
    except (tarfile.TarError, KeyError, OSError, EOFError) as exc:
        raise FetchError(f"could not read {member} from {sdist} ({exc}); delete the file to download it "
                         "again") from None
    write_bytes(target, data)
    return target


def clear_cache(cache: str | os.PathLike | None = None) -> None:
    """Delete the cached archive and every extracted structure of ``cache`` (default :func:`default_cache`).

    Examples
    --------
    >>> import tempfile
    >>> clear_cache(tempfile.mkdtemp())  # nothing cached there: nothing to do
    """
    cache = Path(cache) if cache is not None else default_cache()
    shutil.rmtree(cache / f"MDAnalysisTests-{MDANALYSISTESTS_VERSION}", ignore_errors=True)
    (cache / _SDIST).unlink(missing_ok=True)
