"""Thumbnails: small WebP (or JPEG) copies of the succeeded images, for the gallery page.

`thumbs/` is derived from `images/` and kept in step with it: one thumbnail per image the
manifest lists as succeeded, named after the image and the first characters of its sha256,
so an image redone with other bytes gets a new thumbnail instead of a stale one. A
thumbnail whose image is no longer listed (set aside to superseded/, redone) is removed;
nothing else in the folder is touched.

Real images are ~3 MB 1024x1024 PNGs, so each one is opened lazily, shrunk with Pillow's
`draft` (JPEG decodes at a reduced scale) and `thumbnail` (in place, reducing first), and
closed at once: a worker holds one decoded bitmap at a time. Pillow releases the GIL while
decoding, resizing and encoding, so a small thread pool uses every core.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from imagebatch.tasks.files import TMP_PREFIX, write_atomic

log = logging.getLogger("imagebatch")

THUMBS_DIR = "thumbs"
EXTENSIONS = {"webp": "webp", "jpeg": "jpg"}
# The names this module writes: <image name>[.<sha prefix>].<thumb ext>
_OURS = re.compile(r"^.+\.(png|jpg|jpeg|webp|gif)(\.[0-9a-f]{12})?\.(webp|jpg)$")


@dataclass(frozen=True)
class ThumbSpec:
    size: int = 256  # longest side, in pixels
    format: str = "webp"  # webp | jpeg
    quality: int = 80


def thumb_name(image_file: str, sha256: str | None, spec: ThumbSpec) -> str:
    """`thumbs/<image name>.<sha prefix>.<ext>` for `images/<image name>` (relative paths)."""
    name = image_file.rsplit("/", 1)[-1]
    tag = f".{sha256[:12]}" if sha256 and re.fullmatch(r"[0-9a-f]{12,}", sha256) else ""
    return f"{THUMBS_DIR}/{name}{tag}.{EXTENSIONS[spec.format]}"


def make_thumbnail(source: Path, dest: Path, spec: ThumbSpec) -> None:
    """Write a thumbnail of `source` to `dest` atomically; the decoded bitmap lives only here."""
    with Image.open(source) as img:
        img.draft("RGB", (spec.size, spec.size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
        # Reduce by a whole factor first (a box average, cheap), then Lanczos the rest: for a
        # 3 MB 1024x1024 PNG this is 17 ms of CPU against 27 ms with reducing_gap=2.0 and
        # WebP method 4, for a 256 px thumbnail that looks the same (bench/RESULTS.md).
        img.thumbnail((spec.size, spec.size), Image.Resampling.LANCZOS, reducing_gap=1.0)
        small = ImageOps.exif_transpose(img)
    if spec.format == "jpeg" or small.mode not in ("RGB", "RGBA"):
        small = small.convert("RGBA" if "A" in small.getbands() else "RGB")
    if spec.format == "jpeg" and small.mode == "RGBA":
        flat = Image.new("RGB", small.size, (255, 255, 255))
        flat.paste(small, mask=small.getchannel("A"))
        small = flat
    buf = io.BytesIO()
    if spec.format == "webp":
        small.save(buf, "WEBP", quality=spec.quality, method=0)
    else:
        small.save(buf, "JPEG", quality=spec.quality, optimize=True)
    write_atomic(dest, buf.getvalue(), sync_dir=False)


def sync_thumbnails(
    out_dir: Path,
    images: Iterable[tuple[str, str | None]],
    spec: ThumbSpec,
    workers: int | None = None,
) -> dict[str, str]:
    """Make the missing thumbnails of `images` ((file, sha256) pairs) and remove stale ones.

    Returns {image file: thumbnail file} for every image that has a thumbnail. An image that
    cannot be read gets none (logged): the page then shows its card without a picture."""
    folder = out_dir / THUMBS_DIR
    folder.mkdir(exist_ok=True)
    wanted = {f: thumb_name(f, sha, spec) for f, sha in images if _is_image_path(f)}
    todo = [(f, t) for f, t in wanted.items() if not (out_dir / t).is_file()]
    failed: dict[str, str] = {}

    def one(item: tuple[str, str]) -> None:
        image_file, thumb = item
        try:
            make_thumbnail(out_dir / image_file, out_dir / thumb, spec)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            failed[image_file] = str(exc)

    if todo:
        with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(one, todo))
    if failed:
        first = next(iter(failed.items()))
        log.warning("no thumbnail for %d image(s), e.g. %s: %s", len(failed), *first)
    keep = {t.rsplit("/", 1)[-1] for f, t in wanted.items() if f not in failed}
    _remove_stale(folder, keep)
    return {f: t for f, t in wanted.items() if f not in failed}


class Thumbnailer:
    """Makes thumbnails in the background while a run goes on, as images are stored.

    One worker thread at the lowest CPU priority (Linux lets a thread be niced on its own),
    so it uses the time the run spends waiting on the network and yields the CPU to
    dispatching otherwise; whatever it has not reached when the run ends is made by
    `sync_thumbnails`. Failures are left to that pass too, which reports them."""

    def __init__(self, out_dir: Path, spec: ThumbSpec) -> None:
        self.out_dir = out_dir
        self.spec = spec
        try:
            (out_dir / THUMBS_DIR).mkdir(exist_ok=True)
        except OSError:
            pass  # each thumbnail then fails quietly; the end-of-run pass reports why
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="imagebatch-thumbs", initializer=_lowest_priority
        )

    def submit(self, image_file: str, sha256: str | None) -> None:
        if _is_image_path(image_file):
            self._pool.submit(self._one, image_file, thumb_name(image_file, sha256, self.spec))

    def _one(self, image_file: str, thumb: str) -> None:
        if (self.out_dir / thumb).is_file():
            return
        try:
            make_thumbnail(self.out_dir / image_file, self.out_dir / thumb, self.spec)
        except Exception:  # the end-of-run pass retries it, and reports what still fails
            pass

    def close(self) -> None:
        """Finish the thumbnail in progress and drop the queue: the end-of-run pass makes the
        rest faster, on every core at normal priority."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _lowest_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def _is_image_path(rel: str) -> bool:
    parts = rel.split("/")
    return len(parts) == 2 and parts[0] == "images" and parts[1] not in ("", ".", "..")


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Remove our thumbnails that no listed image explains, and our own leftover temp files."""
    for path in folder.iterdir():
        name = path.name
        if not path.is_file() or name in keep:
            continue
        if name.startswith(TMP_PREFIX) or _OURS.match(name):
            path.unlink(missing_ok=True)
