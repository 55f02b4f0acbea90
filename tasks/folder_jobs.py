"""Jobs from a folder: one edit or variation row per image, masks paired by file name.

`photo.jpg` pairs with `photo_mask.png` (the suffix is configurable); mask files are never
rows of their own. Paths are written relative to the jobs file's folder, which is where a
run resolves them. Nothing is decoded here: `imagebatch validate` does that.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from imagebatch.tasks.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")


@dataclass
class FolderJobs:
    columns: list[str]
    rows: list[dict[str, str]]  # every cell text ("" when empty)
    unpaired_masks: list[Path] = field(default_factory=list)  # masks with no image of that name

    def csv_bytes(self) -> bytes:
        """The jobs CSV (quoted only where needed, as `read_jobs` reads it back)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows([row[c] for c in self.columns] for row in self.rows)
        return buf.getvalue().encode("utf-8")


def _images(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def jobs_from_folder(
    folder: Path,
    jobs_file: Path,
    *,
    operation: str,
    prompt: str = "",
    model: str = "",
    mask_suffix: str = "_mask",
    recursive: bool = False,
    extra: dict[str, str] | None = None,
) -> FolderJobs:
    """The jobs for every image in `folder`; paths relative to `jobs_file`'s folder."""
    if operation not in ("edit", "variation"):
        raise InputError(f"operation must be edit or variation, got {operation!r}")
    if operation == "edit" and not prompt.strip():
        raise InputError("edits need a prompt (--prompt)")
    if not folder.is_dir():
        raise InputError(f"not a folder: {folder}")
    files = _images(folder, recursive)
    masks = {
        p.with_name(p.stem[: -len(mask_suffix)]): p
        for p in files
        if mask_suffix and p.stem.endswith(mask_suffix) and len(p.stem) > len(mask_suffix)
    }
    mask_files = set(masks.values())
    images = [p for p in files if p not in mask_files]
    stems = [str(p.relative_to(folder).with_suffix("")) for p in images]
    base = jobs_file.resolve().parent
    rows = []
    for path, stem in zip(images, stems):
        # x.jpg and x.png in one folder: the ids keep the extension to stay unique
        job_id = stem if stems.count(stem) == 1 else str(path.relative_to(folder))
        row = {"id": job_id, "operation": operation, "model": model, "prompt": prompt}
        row["image"] = Path(os.path.relpath(path.resolve(), base)).as_posix()
        mask = masks.get(path.with_suffix("")) if operation == "edit" else None
        row["mask"] = Path(os.path.relpath(mask.resolve(), base)).as_posix() if mask else ""
        row.update(extra or {})
        rows.append(row)
    used = {m for p in images if (m := masks.get(p.with_suffix(""))) is not None}
    unpaired = sorted(mask_files - used) if operation == "edit" else []
    columns = ["id", "operation", "model", "prompt", "image", "mask", *(extra or {})]
    return FolderJobs(columns, rows, unpaired)
