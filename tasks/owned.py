"""Owned files: the files the tool owns: which images are done, where each one lives, and moving them.

The journal is the only proof that a file is ours. A file under the output folder is moved
(never deleted) only when the latest journal line of some key names it; anything else in
`images/` (a user's own files, an edit source next to the jobs file) is left alone, and a
new image that would take its name gets `-<key>` added instead. Every move is journaled
first, with `moved_from`, so a crash halfway is finished by the next run, not paid again:

- `recover`: finish moves a crash interrupted (staged images, superseded moves).
- `pending_work`: which images need a request; finished ones found in `superseded/`
  are moved back instead of being paid for again.
- `make_room`: before dispatch, move the tool's own old files off the names new images take.
- `set_aside`: after the run, move the tool's files that no row names into `superseded/`.
"""

from __future__ import annotations

import dataclasses
import secrets
import time

from imagebatch.tasks.errors import OutputError
from imagebatch.tasks.files import move_new
from imagebatch.tasks.journal import ImageRecord, Journal
from imagebatch.tasks.plan import PlannedJob
from imagebatch.tasks.store import STAGING, ImageStore

SUPERSEDED = "superseded"
_FOLDERS = ("images", SUPERSEDED, STAGING)

Work = list[tuple[PlannedJob, list[int]]]


def safe_rel(rel: str | None) -> bool:
    """A journal path the tool may touch: `<one of its folders>/<plain file name>`."""
    if not rel or "\\" in rel or "\x00" in rel:
        return False
    parts = rel.split("/")
    return len(parts) == 2 and parts[0] in _FOLDERS and parts[1] not in ("", ".", "..")


class Files:
    """Moves of the tool's own files, each recorded in the journal before it happens."""

    def __init__(
        self, store: ImageStore, journal: Journal, records: dict[str, ImageRecord]
    ) -> None:
        self.store = store
        self.out_dir = store.out_dir
        self.journal = journal
        self.records = records  # latest record per key; updated as files move

    def move(self, key: str, dest: str) -> None:
        """Move key's file to `dest` (relative): journal line first, then the rename."""
        rec = self.records[key]
        src = rec.file
        if not (safe_rel(src) and safe_rel(dest)):
            raise OutputError(f"refusing to move {src!r}: not a file imagebatch keeps")
        moved = dataclasses.replace(rec, file=dest, moved_from=src, finished_at=time.time())
        self.journal.append(moved)
        target = self.out_dir / dest
        target.parent.mkdir(exist_ok=True)
        move_new(self.out_dir / src, target)  # type: ignore[operator]
        self.records[key] = moved

    def recover(self) -> int:
        """Finish moves a crash interrupted; then empty the staging folder. Returns how many."""
        finished = 0
        for rec in list(self.records.values()):
            if rec.status != "succeeded" or not rec.moved_from or not rec.sha256:
                continue
            if not (safe_rel(rec.file) and safe_rel(rec.moved_from)):
                continue
            dest = self.out_dir / rec.file  # type: ignore[operator]
            if dest.exists() or dest.is_symlink():
                continue
            if self.store.verify(rec.moved_from, rec.sha256):
                dest.parent.mkdir(exist_ok=True)
                move_new(self.out_dir / rec.moved_from, dest)
                finished += 1
        self.store.clear_staging()
        return finished

    def free_name(self, stem: str, ext: str, key: str) -> str:
        """`images/<stem>.<ext>`, or with `-<key>` when a file that is not ours holds it."""
        for candidate in (stem, f"{stem}-{key[:8]}", f"{stem}-{key[:8]}-{secrets.token_hex(3)}"):
            path = self.store.images_dir / f"{candidate}.{ext}"
            if not (path.exists() or path.is_symlink()):
                return f"images/{candidate}.{ext}"
        raise OutputError(f"no free file name for {stem} under {self.store.images_dir}")

    def pending_work(
        self, planned: list[PlannedJob], *, retry_failed: bool, force: bool
    ) -> tuple[Work, int]:
        """Which images still need a request; a finished image counts only if its file
        verifies, and one found in superseded/ is moved back rather than paid for again."""
        work: Work = []
        skipped = 0
        for plan in planned:
            todo = []
            for index, key in enumerate(plan.keys):
                rec = self.records.get(key)
                if force or rec is None:
                    todo.append(index)
                elif rec.status == "succeeded":
                    if rec.file and rec.sha256 and self.store.verify(rec.file, rec.sha256):
                        if rec.file.startswith(f"{SUPERSEDED}/"):
                            ext = rec.file.rsplit(".", 1)[-1]
                            self.move(key, self.free_name(plan.image_stem(index), ext, key))
                        skipped += 1
                    else:
                        todo.append(index)
                elif rec.status in ("failed", "rejected", "not_run") and retry_failed:
                    todo.append(index)
                else:
                    skipped += 1
            if todo:
                work.append((plan, todo))
        return work, skipped

    def make_room(self, work: Work) -> None:
        """Before dispatch: the names pending images take are freed of the tool's own older
        files (moved to superseded/); a name held by anything else makes the image take
        another name (ImageStore.names). Pending images' old records are dropped, so a run
        that stops before redoing them reports them not_run."""
        by_stem: dict[str, list[str]] = {}
        for path in self.store.images_dir.iterdir():
            by_stem.setdefault(path.name.rsplit(".", 1)[0], []).append(path.name)
        owners = {
            rec.file: key
            for key, rec in self.records.items()
            if rec.status == "succeeded" and rec.file
        }
        for plan, indices in work:
            for index in indices:
                stem, key = plan.image_stem(index), plan.keys[index]
                for name in by_stem.get(stem, []):
                    owner = owners.get(f"images/{name}")
                    if owner is not None and owner in self.records:
                        self.move(owner, self.superseded_name(name))
                    elif owner is None:
                        alt = f"{stem}-{key[:8]}"
                        if alt in by_stem:
                            alt = f"{alt}-{secrets.token_hex(3)}"
                        self.store.names[key] = alt
                self.records.pop(key, None)

    def superseded_name(self, name: str) -> str:
        folder = self.out_dir / SUPERSEDED
        if folder.is_symlink():
            raise OutputError(f"{folder} is a symbolic link; imagebatch will not move files there")
        dest = folder / name
        if dest.exists() or dest.is_symlink():
            stem, dot, ext = name.rpartition(".")
            name = f"{stem}-{secrets.token_hex(3)}{dot}{ext}"
        return f"{SUPERSEDED}/{name}"

    def set_aside(self, keep: set[str]) -> tuple[list[str], str | None]:
        """Move the tool's files under images/ that no manifest row names into superseded/.
        Returns the files moved, and why it stopped early (a full disk), if it did."""
        moved: list[str] = []
        try:
            self.journal.open()
            for key, rec in list(self.records.items()):
                rel = rec.file
                if rec.status != "succeeded" or not rel or not rel.startswith("images/"):
                    continue
                path = self.out_dir / rel
                if rel in keep or not safe_rel(rel) or path.is_symlink() or not path.is_file():
                    continue
                self.move(key, self.superseded_name(path.name))
                moved.append(rel)
        except OutputError as exc:
            return moved, str(exc)
        finally:
            self.journal.close()
        return moved, None
