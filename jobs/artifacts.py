"""Artifact bookkeeping: digests and manifests when a job finishes, safe path resolution and tar streaming when a
client downloads one.

Downloads only ever serve paths recorded in the database (a file artifact's path, or an entry of a directory
artifact's manifest), resolved under ``ARTIFACT_ROOT`` and checked to stay inside it, so a request cannot reach
any other file.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Described:
    """What the database records about one artifact."""

    kind: str
    path: str
    size: int
    sha256: str
    files: list[dict[str, Any]] | None


def describe(path: Path, root: Path) -> Described:
    """Kind, path relative to ``root``, size and digest of a file or directory artifact.

    A directory gets a manifest of its regular files (sorted relative paths, sizes, digests; symlinks are
    skipped) and the SHA-256 of the manifest lines ``<sha256>  <path>``.

    Raises:
        ValueError: ``path`` is not under ``root`` or is neither a file nor a directory.
    """
    path = path.resolve()
    root = root.resolve()
    if root not in path.parents:
        raise ValueError(f"artifact {path} is outside the artifact root {root}")
    rel = path.relative_to(root).as_posix()
    if path.is_file():
        return Described("file", rel, path.stat().st_size, sha256_file(path), None)
    if not path.is_dir():
        raise ValueError(f"artifact {path} is neither a file nor a directory")
    files: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if full.is_symlink() or not full.is_file():
                continue
            files.append(
                {"path": full.relative_to(path).as_posix(), "size": full.stat().st_size, "sha256": sha256_file(full)}
            )
    manifest = "".join(f"{f['sha256']}  {f['path']}\n" for f in files)
    return Described(
        "directory", rel, sum(int(f["size"]) for f in files), hashlib.sha256(manifest.encode()).hexdigest(), files
    )


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative`` resolved, refusing anything that leaves ``root``.

    Raises:
        PermissionError: the path escapes the root (``..``, absolute paths, symlinks out).
    """
    root = root.resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise PermissionError(f"{relative!r} is outside the artifact root")
    return path


def iter_file(path: Path, chunk: int = CHUNK) -> Iterator[bytes]:
    """The bytes of a file in chunks."""
    with open(path, "rb") as fh:
        while data := fh.read(chunk):
            yield data


def tar_size(files: list[tuple[str, Path, int]]) -> int:
    """Exact byte length of :func:`iter_tar` for ``files`` (lets the response carry ``Content-Length``)."""
    total = 0
    for arcname, _path, size in files:
        total += len(_tar_header(arcname, size, 0)) + size + (-size % tarfile.BLOCKSIZE)
    total += 2 * tarfile.BLOCKSIZE
    return total + (-total % tarfile.RECORDSIZE)


def _tar_header(arcname: str, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(arcname)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def iter_tar(files: list[tuple[str, Path, int]]) -> Iterator[bytes]:
    """Stream an uncompressed tar of ``(arcname, path, size)`` entries without holding a file in memory.

    Raises:
        OSError: a file changed size while streaming (the archive would be corrupt).
    """
    written = 0
    for arcname, path, size in files:
        header = _tar_header(arcname, size, 0)
        written += len(header)
        yield header
        sent = 0
        for data in iter_file(path):
            sent += len(data)
            if sent > size:
                raise OSError(f"{arcname} grew while it was being sent")
            yield data
        if sent != size:
            raise OSError(f"{arcname} shrank while it was being sent")
        pad = -size % tarfile.BLOCKSIZE
        written += size + pad
        if pad:
            yield b"\0" * pad
    end = 2 * tarfile.BLOCKSIZE
    written += end
    yield b"\0" * (end + (-written % tarfile.RECORDSIZE))
