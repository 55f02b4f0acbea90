"""Files on disk: atomic writes, durable renames, content hashes. Every stage that writes
or checks a file uses these, so there is one way to do each."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from pathlib import Path

from imagebatch.tasks.errors import OutputError

TMP_PREFIX = ".tmp-"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes, read in chunks; None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make renames in `path` durable (the journal does this once per batch of records)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write `data` to `path` so that `path` is either absent, the old file, or all of `data`.

    `sync_dir=False` leaves making the rename durable to the caller: images do it once per
    batch of journal records instead of once per file."""
    _write(path, data, None, sync_dir)


def write_atomic_hashed(path: Path, data: bytes, *, sync_dir: bool = True) -> str:
    """`write_atomic` that hashes as it writes, returning the sha256: each 1 MB piece is
    hashed while it is still in the CPU cache, and the bytes are read once, not twice."""
    digest = hashlib.sha256()
    _write(path, data, digest, sync_dir)
    return digest.hexdigest()


WRITE_CHUNK = 1 << 20


def _write(path: Path, data: bytes, digest: hashlib._Hash | None, sync_dir: bool) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            if digest is None:
                f.write(data)
            else:
                view = memoryview(data)  # slices without copies
                for start in range(0, len(view), WRITE_CHUNK):
                    piece = view[start : start + WRITE_CHUNK]
                    digest.update(piece)
                    f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        what = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise OutputError(f"cannot write {path}: {what}") from None
    if sync_dir:
        fsync_dir(path.parent)


def move_new(src: Path, dest: Path) -> None:
    """Rename `src` to `dest`, which must not exist: a move never replaces any file."""
    if dest.exists() or dest.is_symlink():
        raise OutputError(f"{dest} already exists; imagebatch never replaces a file it moves to")
    try:
        os.replace(src, dest)
    except OSError as exc:
        what = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise OutputError(f"cannot move {src} to {dest}: {what}") from None
