"""Atomic file output shared by every writer, and the checked reader of the model files they write.

A writer never leaves a half-written file that looks complete: it writes to a hidden temporary
file in the destination's directory, flushes it to disk, then renames it over the destination
(``os.replace`` is atomic on POSIX and Windows). If the writer raises, the temporary file is removed
and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_path", "atomic_open", "write_text", "write_bytes", "write_json", "output_dir", "read_model_file"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path``.

    For libraries that write by file name (``nibabel.save``, ``mrcfile.new``, ``torch.save``, …).
    The temporary name keeps the full suffix (``.nii.gz``, ``.mrc``) because some libraries choose
    the format from it.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> out = Path(tempfile.mkdtemp()) / "x.npy"
    >>> with atomic_path(out) as tmp:
    ...     np.save(tmp, np.zeros(3))
    >>> out.exists()
    True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{secrets.token_hex(4)}-{path.name}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer did not create {tmp}")
        with open(tmp, "rb+") as fh:  # make the content durable before it becomes visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open()`` for writing whose result appears at ``path`` only if the block succeeds."""
    if not mode.startswith(("w", "x")):
        raise ValueError(f"atomic_open writes a new file; mode {mode!r} is not a write mode")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Atomically write ``obj`` as JSON (NaN is refused: it is not JSON)."""
    return write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (and its parents) if needed; an existing non-folder is an error.

    Raises
    ------
    InputError
        ``path`` exists and is not a directory.
    """
    from bioinverse.errors import InputError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def read_model_file(path: str | os.PathLike, expected_format: str, what: str) -> dict:
    """The dictionary a model file written with ``torch.save`` holds, read with ``weights_only=True``.

    Raises
    ------
    InputError
        A missing, empty, unreadable (truncated, foreign) file, or one whose ``format`` tag is not
        ``expected_format`` (the message says it is not ``what``).
    """
    import torch

    from bioinverse._checks import nonempty_file
    from bioinverse.errors import InputError

    path = Path(path)
    nonempty_file(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch raises many types for a truncated or foreign file)
        reason = (str(exc).strip().splitlines() or [""])[0][:100]
        raise InputError(path, f"is not a readable model file ({type(exc).__name__}: {reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        raise InputError(path, f"is not {what} (expected format {expected_format!r})")
    return payload
