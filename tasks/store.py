"""Store: decode every image with Pillow, then write it atomically (temp file, fsync, rename).

A file under `images/` with its final name is always a whole, decodable image: a crash
leaves at most a `.tmp-*` file, which the next run removes.
"""

from __future__ import annotations

import io
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from imagebatch.tasks.errors import OutputError
from imagebatch.tasks.files import TMP_PREFIX, file_sha256, sha256_hex, write_atomic

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}


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

    def prepare(self) -> None:
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.images_dir}: {exc.strerror or exc}") from None
        if not os.access(self.images_dir, os.W_OK):
            raise OutputError(f"{self.images_dir} is not writable")
        for leftover in self.images_dir.glob(f"{TMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)

    def save(self, data: bytes, stem: str, index: int) -> StoredImage:
        """Decode, then write `images/<stem>_<index>.<ext>`; the extension follows the real format."""
        fmt, width, height = decode(data)
        ext = EXTENSIONS.get(fmt, fmt.lower())
        rel = f"images/{stem}_{index}.{ext}"
        if not self.images_dir.is_dir():
            raise OutputError(f"the output folder {self.images_dir} vanished during the run")
        write_atomic(self.out_dir / rel, data, sync_dir=False)
        return StoredImage(rel, sha256_hex(data), width, height, fmt.lower(), len(data))

    def set_aside(self, keep: set[str], folder: str = "superseded") -> list[str]:
        """Move files under images/ that no manifest row names into `folder`/; never delete paid work.

        Returns the moved files (relative paths, as they were)."""
        moved = []
        target = self.out_dir / folder
        for path in sorted(self.images_dir.iterdir()):
            rel = f"images/{path.name}"
            if rel in keep or path.name.startswith(TMP_PREFIX) or not path.is_file():
                continue
            target.mkdir(exist_ok=True)
            dest = target / path.name
            if dest.exists():
                dest = target / f"{path.stem}-{secrets.token_hex(3)}{path.suffix}"
            os.replace(path, dest)
            moved.append(rel)
        return moved

    def verify(self, rel: str, sha256: str) -> bool:
        """True when the file is there and its bytes hash to `sha256`."""
        path = self.out_dir / rel
        return file_sha256(path) == sha256
