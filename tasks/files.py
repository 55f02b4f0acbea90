"""Files on disk: atomic writes, durable renames, content hashes. Every stage that writes
or checks a file uses these, so there is one way to do each."""

from __future__ import annotations

import contextlib
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
    _write(path, data, sync_dir)


WRITE_CHUNK = 1 << 20


def write_new_hashed(path: Path, data: bytes) -> str:
    """Create `path`, which must not exist, holding `data` (fsynced); returns its sha256.

    No temporary name and no rename: only for a folder whose files count for nothing until a
    journal line names them with their hash (the store's staging folder), so a file a crash
    cut short is never taken for a whole one. Each 1 MB piece is hashed while it is still in
    the CPU cache, and the bytes are read once, not twice. The file's directory entry is made
    durable by the caller (the journal fsyncs the folder before the line that names it)."""
    digest = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {_why(exc)}") from None
    try:
        view = memoryview(data)  # slices without copies
        for start in range(0, len(view), WRITE_CHUNK):
            piece = view[start : start + WRITE_CHUNK]
            digest.update(piece)
            while piece:  # a nearly full disk may take part of a write without an error
                written = os.write(fd, piece)
                if written <= 0:
                    raise OSError(errno.ENOSPC, "short write")
                piece = piece[written:]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise OutputError(f"cannot write {path}: {_why(exc)}") from None
    os.close(fd)
    return digest.hexdigest()


def _why(exc: OSError) -> str:
    return "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)


def _write(path: Path, data: bytes, sync_dir: bool) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise OutputError(f"cannot write {path}: {_why(exc)}") from None
    if sync_dir:
        fsync_dir(path.parent)


def move_new(src: Path, dest: Path) -> None:
    """Rename `src` to `dest`, which must not exist: a move never replaces any file."""
    if dest.exists() or dest.is_symlink():
        raise OutputError(f"{dest} already exists; imagebatch never replaces a file it moves to")
    try:
        os.replace(src, dest)
    except OSError as exc:
        raise OutputError(f"cannot move {src} to {dest}: {_why(exc)}") from None
