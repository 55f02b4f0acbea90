"""Store: decode every image with Pillow, then write it atomically (temp file, fsync, rename).

A file under `images/` with its final name is always a whole, decodable image. Images are
staged in the tool's own folder `.imagebatch-tmp/` (fsynced), recorded in the journal, and
only then renamed into `images/`: a crash between the two leaves a staged file the journal
names, which the next run finishes moving instead of paying for the image again. Nothing
under `images/` is ever overwritten: whatever holds a name there is moved aside first, and
only if the journal says the tool wrote it (tasks/files.py).
"""

from __future__ import annotations

import io
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from imagebatch.tasks.errors import OutputError
from imagebatch.tasks.files import file_sha256, move_new, sha256_hex, write_atomic

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}
STAGING = ".imagebatch-tmp"  # the tool's own folder under --out: everything in it is ours


class CorruptImage(ValueError):
    """The server's bytes are not a decodable image."""


@dataclass(frozen=True)
class StoredImage:
    file: str  # relative to the output folder, with forward slashes
    sha256: str
    width: int
    height: int
    format: str
    bytes: int
    staged: str | None = None  # where the bytes are until `commit` moves them to `file`


def decode(data: bytes) -> tuple[str, int, int]:
    """Fully decode the bytes (not just the header) and return (format, width, height)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.format or "unknown", img.width, img.height
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImage(f"the image bytes do not decode: {exc}") from None


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

    def save(self, data: bytes, stem: str, index: int, key: str | None = None) -> StoredImage:
        """Decode and write `images/<stem>_<index>.<ext>` at once (stage, then commit)."""
        stored = self.stage(data, f"{stem}_{index}", key)
        self.commit(stored)
        return stored

    def stage(self, data: bytes, stem: str, key: str | None = None) -> StoredImage:
        """Decode, then write the bytes durably into the staging folder; `file` is the name
        they will have under images/ (the extension follows the real format)."""
        fmt, width, height = decode(data)
        ext = EXTENSIONS.get(fmt, fmt.lower())
        stem = self.names.get(key, stem) if key else stem
        rel = f"images/{stem}.{ext}"
        if not self.images_dir.is_dir() or not self.staging_dir.is_dir():
            raise OutputError(f"the output folder {self.out_dir} vanished during the run")
        staged = f"{STAGING}/{stem}.{ext}.{secrets.token_hex(4)}"
        write_atomic(self.out_dir / staged, data, sync_dir=False)
        return StoredImage(rel, sha256_hex(data), width, height, fmt.lower(), len(data), staged)

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
