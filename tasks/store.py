"""Store: check every image without decoding its pixels, then write it atomically.

A file under `images/` with its final name is always a whole PNG, JPEG or WebP of the size
the request asked for. The check reads the container, not the pixels: Pillow reads the
header; for PNG every chunk's CRC is checked up to IEND (a truncated or bit-flipped file
fails), for JPEG the EOI marker, for WebP the RIFF length; no bitmap is ever decoded or
kept. Not caught: a deflate or JPEG stream damaged under correct checksums (docs/design.md).
Images are written and hashed in one pass straight to a fresh name in the tool's own folder
`.imagebatch-tmp/` (fsynced; no temporary name, no rename), recorded in the journal with their
sha256, and only then renamed into `images/`. A staged file counts only once a journal line
names it, and the next run moves it only when its bytes hash to that line's sha256: a crash
mid-write leaves a file no line names (cleared), a crash after the line leaves one the next
run finishes moving instead of paying for the image again. Nothing under
`images/` is ever overwritten: whatever holds a name there is moved aside first, and only
if the journal says the tool wrote it (tasks/files.py). This work runs in a small thread
pool of its own (`run_off_loop`): hashing, writing and Pillow release the GIL, so the event
loop keeps reading other answers meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import secrets
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, UnidentifiedImageError

from imagebatch.configs.registry import parse_size
from imagebatch.tasks.errors import OutputError
from imagebatch.tasks.files import file_sha256, move_new, write_new_hashed

# The only formats stored, and their extensions (what the Images API can return).
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
STAGING = ".imagebatch-tmp"  # the tool's own folder under --out: everything in it is ours
WORKERS = min(4, os.cpu_count() or 1)
_T = TypeVar("_T")
_pool: ThreadPoolExecutor | None = None


class CorruptImage(ValueError):
    """The server's bytes are not a whole image."""


class UnexpectedImage(CorruptImage):
    """A whole image, but not what was asked for: a format we do not store or that the
    request did not ask for, or another size. `code` goes in the manifest's error_code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Expected:
    """What the request asked for; None: anything (size `auto` or none, no output_format)."""

    format: str | None = None  # PNG, JPEG or WEBP (Pillow's names)
    size: tuple[int, int] | None = None

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Expected:
        """From a request's parameters: `size` WxH and `output_format` when they were sent."""
        size = parse_size(str(params.get("size") or ""))
        fmt = str(params.get("output_format") or "").strip().upper()
        fmt = {"JPG": "JPEG"}.get(fmt, fmt)
        return cls(fmt if fmt in EXTENSIONS else None, size)


@dataclass(frozen=True)
class StoredImage:
    file: str  # relative to the output folder, with forward slashes
    sha256: str
    width: int
    height: int
    format: str
    bytes: int
    staged: str | None = None  # where the bytes are until `commit` moves them to `file`


def check_image(data: bytes, expected: Expected | None = None) -> tuple[str, int, int]:
    """(format, width, height) of a whole PNG, JPEG or WebP, read from its container
    without decoding pixels; CorruptImage when it is not whole, UnexpectedImage when it is
    not what `expected` says."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, width, height = img.format or "unknown", img.width, img.height
            if fmt not in EXTENSIONS:
                raise UnexpectedImage(
                    f"the server returned a {fmt} image; only PNG, JPEG and WebP are stored",
                    "unexpected_image_format",
                )
            if fmt != "PNG":
                img.verify()  # PNG is walked below, without the copies verify makes
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, UnexpectedImage):
            raise
        raise CorruptImage(f"the image bytes are not a whole image: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise CorruptImage(f"the image is too large to accept: {exc}") from None
    if not (_png_chunks_whole(data) if fmt == "PNG" else _ends_whole(fmt, data)):
        raise CorruptImage(f"the {fmt} image is truncated or damaged")
    _check_expected(fmt, width, height, expected or Expected())
    return fmt, width, height


def _png_chunks_whole(data: bytes) -> bool:
    """Every chunk's CRC is right and IEND ends the data: a cut or a flipped bit fails. Walks
    a memoryview (Pillow's `verify` copies each chunk, twice for the big IDAT); inflates nothing."""
    view = memoryview(data)
    pos = 8  # after the signature, which Image.open has checked
    while pos + 12 <= len(view):
        length = int.from_bytes(view[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(view):
            return False
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            return False
        if view[pos + 4 : pos + 8] == b"IEND":
            rest = view[end:]  # a little padding after IEND is tolerated, nothing else
            return len(rest) <= 64 and not bytes(rest).strip(b"\x00\r\n")
        pos = end
    return False


def _ends_whole(fmt: str, data: bytes) -> bool:
    """JPEG ends in EOI (trailing padding allowed); a WebP's RIFF length covers the data.
    A file cut short fails here, where Pillow's `verify` reads no further."""
    tail = data[-64:].rstrip(b"\x00\r\n")
    if fmt == "JPEG":
        return tail.endswith(b"\xff\xd9")
    if fmt == "WEBP":
        return len(data) >= 12 and int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return True


def _check_expected(fmt: str, width: int, height: int, expected: Expected) -> None:
    if expected.format is not None and fmt != expected.format:
        raise UnexpectedImage(
            f"asked for {expected.format}, the server returned {fmt}", "unexpected_image_format"
        )
    if expected.size is not None and (width, height) != expected.size:
        want = "x".join(map(str, expected.size))
        raise UnexpectedImage(
            f"asked for {want}, the server returned {width}x{height}", "unexpected_image_size"
        )


async def run_off_loop(func: Callable[..., _T], *args: Any) -> _T:
    """Run image work (checks, hashing, writes, renames) in the store's small thread pool,
    min(4, cores) threads: enough to overlap disk waits, few enough not to fight the loop."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="imagebatch-store")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool, functools.partial(func, *args))


class ImageStore:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.images_dir = out_dir / "images"
        self.staging_dir = out_dir / STAGING
        # key -> file stem, for images whose usual name is held by a file that is not ours
        self.names: dict[str, str] = {}

    def prepare(self) -> None:
        """Create images/ and the staging folder; refuse symlinks (they lead outside --out)."""
        for folder in (self.images_dir, self.staging_dir):
            if folder.is_symlink():
                raise OutputError(
                    f"{folder} is a symbolic link; imagebatch writes only inside the output "
                    "folder. Replace it with a real folder or use another --out"
                )
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create {folder}: {exc.strerror or exc}") from None
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                raise OutputError(f"{folder} is not a writable folder")

    def stage(
        self, data: bytes, stem: str, key: str | None = None, expected: Expected | None = None
    ) -> StoredImage:
        """Check, then write and hash the bytes durably into the staging folder; `file` is
        the name they will have under images/ (the extension follows the real format)."""
        fmt, width, height = check_image(data, expected)
        ext = EXTENSIONS[fmt]
        stem = self.names.get(key, stem) if key else stem
        rel = f"images/{stem}.{ext}"
        if not self.images_dir.is_dir() or not self.staging_dir.is_dir():
            raise OutputError(f"the output folder {self.out_dir} vanished during the run")
        staged = f"{STAGING}/{stem}.{ext}.{secrets.token_hex(4)}"
        sha256 = write_new_hashed(self.out_dir / staged, data)
        return StoredImage(rel, sha256, width, height, fmt.lower(), len(data), staged)

    def commit(self, stored: StoredImage) -> None:
        """Move a staged image to its name under images/, never over an existing file."""
        if stored.staged is not None:
            move_new(self.out_dir / stored.staged, self.out_dir / stored.file)

    def clear_staging(self) -> None:
        """Remove what is left in the staging folder (the tool's own; nothing else is touched)."""
        if self.staging_dir.is_dir() and not self.staging_dir.is_symlink():
            for leftover in self.staging_dir.iterdir():
                if leftover.is_file() or leftover.is_symlink():
                    leftover.unlink(missing_ok=True)

    def verify(self, rel: str, sha256: str) -> bool:
        """True when the file is there and its bytes hash to `sha256`."""
        path = self.out_dir / rel
        return file_sha256(path) == sha256
