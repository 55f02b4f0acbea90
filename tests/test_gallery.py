"""The gallery, thumbnails, dataset metadata and `imagebatch report`, as a user sees them.

A real run (CLI, simulator on loopback, real Prefect API) makes the folder; the page is
opened from disk in headless Chromium (Debian's `chromium`, driven over the DevTools
protocol by tests/browser.py) and the folder is loaded with the `datasets` library.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Before datasets is imported: never reach for the Hub, keep its cache out of $HOME.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "imagebatch-tests-hf"))

import datasets  # the test extra; offline, set above
import pandas as pd
import pytest
from browser import GALLERY_READY as READY
from browser import Browser
from click.testing import CliRunner
from PIL import Image

from imagebatch.cli import main
from imagebatch.configs.settings import GallerySettings
from imagebatch.tasks.manifest import Manifest
from imagebatch.tasks.report import publish
from imagebatch.tasks.thumbs import Thumbnailer, ThumbSpec, sync_thumbnails

HOSTILE_PROMPT = (
    '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
    " & <b>bold</b> <!-- \u2028 end"
)
HOSTILE_NOTE = "<img src=x onerror=window.__pwned=3><a href=javascript:alert(1)>x</a>"
JOBS = [
    {"sku": "G-1", "note": "", "prompt": "a red kite over a beach", "model": "gpt-image-2",
     "size": "1024x1024", "quality": "low", "n": 2},
    {"sku": "G-2", "note": "", "prompt": "a lighthouse at dusk", "model": "dall-e-3",
     "size": "1024x1024", "quality": "standard", "n": 1},
    {"sku": "G-3", "note": HOSTILE_NOTE, "prompt": HOSTILE_PROMPT, "model": "gpt-image-2",
     "size": "1024x1024", "quality": "low", "n": 1},
    {"sku": "G-4", "note": "", "prompt": "a forbidden thing", "model": "gpt-image-2",
     "size": "1024x1024", "quality": "low", "n": 1},
    {"sku": "G-5", "note": "", "prompt": "a bicycle", "model": "dall-e-3",
     "size": "512x512", "quality": "standard", "n": 1},
]  # fmt: skip


def invoke(args: list[str], env: dict[str, str] | None = None):
    return CliRunner().invoke(main, args, env=env or {}, catch_exceptions=False)


@pytest.fixture(scope="module")
def run_dir(prefect_api, sim, tmp_path_factory) -> Path:
    """A finished run: 2 + 1 + 1 succeeded, 1 rejected, 1 invalid."""
    base = tmp_path_factory.mktemp("gallery")
    jobs = base / "jobs.csv"
    pd.DataFrame(JOBS).to_csv(jobs, index=False)
    out = base / "out"
    env = {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-test-gallery"}
    result = invoke(["run", str(jobs), "--out", str(out), "--quiet"], env)
    assert result.exit_code == 1, result.output
    return out


@pytest.fixture
def folder(run_dir, tmp_path) -> Path:
    """A private copy of the run folder, for tests that change it."""
    copy = tmp_path / "out"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.fixture(scope="module")
def browser():
    with Browser(width=1280, height=2000) as b:
        yield b


def manifest(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)


def card_texts(browser: Browser) -> list[str]:
    return browser.eval("Array.from(document.querySelectorAll('.card')).map(c => c.innerText)")


# -- the folder --------------------------------------------------------------------------


def test_run_writes_page_thumbnails_and_metadata(run_dir):
    m = manifest(run_dir)
    assert m.status.value_counts().to_dict() == {"succeeded": 4, "rejected": 1, "invalid": 1}
    done = m[m.status == "succeeded"]
    thumbs = sorted(p.name for p in (run_dir / "thumbs").iterdir())
    assert len(thumbs) == len(done)
    for row in done.itertuples():
        name = f"{Path(row.file).name}.{row.sha256[:12]}.webp"
        assert name in thumbs
        with Image.open(run_dir / "thumbs" / name) as img:
            assert img.format == "WEBP" and max(img.size) == 256
    lines = [json.loads(x) for x in (run_dir / "metadata.jsonl").read_text().splitlines()]
    assert sorted(x["file_name"] for x in lines) == sorted(done.file)
    hostile = next(x for x in lines if x["sku"] == "G-3")
    assert hostile["prompt"] == HOSTILE_PROMPT and hostile["note"] == HOSTILE_NOTE
    assert (run_dir / "index.html").is_file()


def test_hostile_text_is_never_markup_in_the_file(run_dir):
    page = (run_dir / "index.html").read_text(encoding="utf-8")
    data_block = page.split('id="gallery-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data_block and ">" not in data_block and "&" not in data_block
    assert page.count("<script") == 2  # the data block and the page's own script


def test_superseded_image_loses_its_thumbnail(prefect_api, sim, folder, tmp_path):
    jobs = tmp_path / "fewer.csv"
    pd.DataFrame([j for j in JOBS if j["sku"] != "G-2"]).to_csv(jobs, index=False)
    env = {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-test-gallery"}
    before = manifest(folder)
    gone = before.loc[before.sku == "G-2", ["file", "sha256"]].iloc[0]
    result = invoke(["run", str(jobs), "--out", str(folder), "--quiet"], env)
    assert result.exit_code == 1, result.output
    assert (folder / "superseded" / Path(gone.file).name).is_file()
    thumbs = {p.name for p in (folder / "thumbs").iterdir()}
    assert f"{Path(gone.file).name}.{gone.sha256[:12]}.webp" not in thumbs
    assert len(thumbs) == (manifest(folder).status == "succeeded").sum() == 3
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 3 and gone.file not in "".join(lines)


def _image(path: Path, size: tuple[int, int], color: object, fmt: str = "PNG") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA" if fmt == "PNG" else "RGB", size, color).save(path, fmt)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_thumbnails_follow_the_image_bytes_and_leave_other_files(tmp_path):
    sha = _image(tmp_path / "images" / "a_0.png", (1024, 512), (255, 0, 0, 128))  # see-through
    big = _image(tmp_path / "images" / "b_0.jpg", (3000, 2000), "blue", "JPEG")
    images = [("images/a_0.png", sha), ("images/b_0.jpg", big)]
    made = sync_thumbnails(tmp_path, images, ThumbSpec())
    assert made == {f: f"thumbs/{f[7:]}.{h[:12]}.webp" for f, h in images}
    with Image.open(tmp_path / made["images/a_0.png"]) as thumb:
        assert (thumb.format, thumb.size, thumb.mode) == ("WEBP", (256, 128), "RGBA")
    with Image.open(tmp_path / made["images/b_0.jpg"]) as thumb:
        assert thumb.size == (256, 171)
    (tmp_path / "thumbs" / "notes.txt").write_text("mine")
    # the image is redone with other bytes: a new thumbnail, the stale one removed
    sha2 = _image(tmp_path / "images" / "a_0.png", (512, 1024), "green")
    again = sync_thumbnails(tmp_path, [("images/a_0.png", sha2)], ThumbSpec(format="jpeg"))
    assert again == {"images/a_0.png": f"thumbs/a_0.png.{sha2[:12]}.jpg"}
    assert sorted(p.name for p in (tmp_path / "thumbs").iterdir()) == [
        f"a_0.png.{sha2[:12]}.jpg",
        "notes.txt",
    ]
    with Image.open(tmp_path / again["images/a_0.png"]) as thumb:
        assert (thumb.format, thumb.size, thumb.mode) == ("JPEG", (128, 256), "RGB")


def test_background_thumbnailer_works_at_the_lowest_priority(tmp_path):
    sha = _image(tmp_path / "images" / "a_0.png", (600, 300), "red")
    thumbnailer = Thumbnailer(tmp_path, ThumbSpec())
    try:
        thumbnailer.submit("images/a_0.png", sha)
        thumbnailer.submit("../outside.png", None)  # not an image of this folder: ignored
        niceness = thumbnailer._pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, 0)).result(60)
    finally:
        thumbnailer.close()
    assert niceness == 19
    assert [p.name for p in (tmp_path / "thumbs").iterdir()] == [f"a_0.png.{sha[:12]}.webp"]


def test_an_unreadable_image_gets_a_card_without_thumbnail(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad_0.png").write_bytes(b"not an image")
    assert sync_thumbnails(tmp_path, [("images/bad_0.png", None)], ThumbSpec()) == {}


def test_a_gallery_that_cannot_be_written_is_a_notice_not_a_failed_run(prefect_api, sim, tmp_path):
    jobs = tmp_path / "jobs.csv"
    pd.DataFrame(JOBS[:2]).to_csv(jobs, index=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thumbs").write_text("a file where the thumbnails folder should be")
    env = {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-test-gallery"}
    result = invoke(["run", str(jobs), "--out", str(out), "--quiet"], env)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "the gallery (index.html, thumbs/, metadata.jsonl) was not written" in text
    assert (manifest(out).status == "succeeded").all()


# -- the page in a browser ---------------------------------------------------------------


def test_page_shows_one_card_per_row_and_runs_nothing_hostile(run_dir, browser):
    browser.open((run_dir / "index.html").as_uri(), READY)
    m = manifest(run_dir)
    texts = card_texts(browser)
    assert len(texts) == len(m)
    assert browser.errors() == []
    assert browser.eval("typeof window.__pwned") == "undefined"
    assert browser.eval("document.scripts.length") == 2
    assert browser.eval("document.querySelectorAll('[onerror], main script, main b').length") == 0
    prompts = browser.eval(
        "Array.from(document.querySelectorAll('.prompt')).map(p => p.lastChild.textContent)"
    )
    assert HOSTILE_PROMPT in prompts
    assert any(HOSTILE_NOTE in t for t in texts)
    # every card says its status; rejected and invalid ones say why
    for status in ("rejected", "invalid"):
        (card,) = browser.eval(
            f"Array.from(document.querySelectorAll('.st-{status}')).map(c => c.innerText)"
        )
        reason = m.loc[m.status == status, "error_message"].iloc[0]
        assert status in card and reason.split("\n")[0][:40] in card


def test_page_fetches_nothing_but_its_own_files(run_dir, browser):
    browser.open((run_dir / "index.html").as_uri(), READY)
    browser.wait_for("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    urls = browser.requested_urls()
    folder = run_dir.as_uri() + "/"
    assert urls and all(u.startswith(folder) for u in urls), urls
    assert sum("/thumbs/" in u for u in urls) == (manifest(run_dir).status == "succeeded").sum()
    # a thumbnail opens its full image, which is in the folder
    links = browser.eval("Array.from(document.querySelectorAll('.thumb a')).map(a => a.href)")
    assert len(links) == 4 and all((run_dir / u[len(folder) :]).is_file() for u in links)


def test_page_works_from_a_static_web_server(run_dir, browser):
    """The same page over http (any static host): its CSP still lets its own images in."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(run_dir))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            base = f"http://127.0.0.1:{server.server_address[1]}/"
            browser.open(base + "index.html", READY)
            browser.wait_for(
                "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
            )
            # the browser asks any web server for /favicon.ico by itself; not the page's doing
            errors = [e for e in browser.errors() if not e.endswith("/favicon.ico)")]
            assert errors == []
            assert browser.eval("document.querySelectorAll('.card').length") == len(
                manifest(run_dir)
            )
            urls = browser.requested_urls()
            assert all(u.startswith(base) for u in urls), urls
            assert sum("/thumbs/" in u for u in urls) == 4
        finally:
            server.shutdown()


def test_the_network_check_sees_a_request_off_disk(tmp_path, browser):
    """Control for the test above: a page that does reach out is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<img src="http://example.invalid/x.png"><p>leak</p>')
    browser.open(page.as_uri())
    assert "http://example.invalid/x.png" in browser.requested_urls()


def test_csp_blocks_a_script_that_got_into_the_page(folder, browser):
    """Defence in depth: even markup injected into the file itself cannot run a script."""
    page = (folder / "index.html").read_text(encoding="utf-8")
    injected = page.replace(
        "<main", '<script>window.__pwned = 4</script><img src=x onerror="window.__pwned = 5"><main'
    )
    # In a copy of the run folder, so the page's thumbnails exist: a page without them would
    # log load errors late, into whichever test opens the next page.
    target = folder / "index.html"
    target.write_text(injected, encoding="utf-8")
    browser.open(target.as_uri(), READY)
    assert browser.eval("typeof window.__pwned") == "undefined"
    assert any("Content Security Policy" in e for e in browser.errors())


def test_filters_and_search(run_dir, browser):
    browser.open((run_dir / "index.html").as_uri(), READY)

    def choose(select: str, value: str) -> int:
        browser.eval(
            f"(() => {{ const s = document.getElementById('{select}'); s.value = {json.dumps(value)};"
            " s.dispatchEvent(new Event('change')); })()"
        )
        return browser.eval("document.querySelectorAll('.card').length")

    assert choose("status", "succeeded") == 4
    assert choose("model", "dall-e-3") == 1  # the invalid dall-e-3 row is not succeeded
    assert choose("status", "") == 2
    assert choose("model", "") == 6
    browser.eval(
        "(() => { const q = document.getElementById('q'); q.value = 'LIGHTHOUSE';"
        " q.dispatchEvent(new Event('input')); })()"
    )
    (text,) = card_texts(browser)
    assert "G-2" in text and "revised prompt" in text
    assert browser.errors() == []


def test_ten_thousand_rows_render_one_page_at_a_time(tmp_path, browser):
    statuses = ["succeeded", "failed", "rejected", "invalid", "not_run"]
    rows = [
        {
            "job_id": f"job{i:05d}",
            "row": i + 1,
            "image_index": 0,
            "model": "gpt-image-2" if i % 3 else "dall-e-3",
            "prompt": f"prompt number {i}",
            "status": statuses[i % 5],
            "error_code": None if i % 5 in (0, 4) else "server_error",
            "error_message": None if i % 5 in (0, 4) else f"reason {i}",
            "file": None,
            "sku": f"SKU-{i}",
        }
        for i in range(10_000)
    ]
    manifest = Manifest([*rows[0]], rows)
    publish(tmp_path, manifest, {"finished_at": "2026-01-01T00:00:00"}, GallerySettings())
    browser.open((tmp_path / "index.html").as_uri(), READY)
    assert browser.errors() == []
    assert browser.eval("document.querySelectorAll('.card').length") == 60
    assert browser.eval("document.getElementById('count').textContent") == "1–60 of 10000"
    browser.eval(
        "(() => { for (let i = 0; i < 166; i++) document.getElementById('next').click(); })()"
    )
    assert browser.eval("document.getElementById('count').textContent") == "9961–10000 of 10000"
    assert browser.eval("document.getElementById('next').disabled") is True
    browser.eval(
        "(() => { const s = document.getElementById('status'); s.value = 'not_run';"
        " s.dispatchEvent(new Event('change')); })()"
    )
    assert browser.eval("document.getElementById('count').textContent") == "1–60 of 2000"
    card = card_texts(browser)[0]
    assert "no image: not_run" in card and "the run stopped before" in card


# -- the dataset -------------------------------------------------------------------------


def test_datasets_loads_the_folder_as_an_imagefolder(folder, tmp_path):
    m = manifest(folder)
    done = m[m.status == "succeeded"]
    # thumbs/ and superseded/ hold images too; the metadata decides what is in the dataset
    (folder / "superseded").mkdir()
    shutil.copy(folder / done.file.iloc[0], folder / "superseded" / "old.png")
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(folder), cache_dir=str(tmp_path / "cache")
    )
    assert list(ds) == ["train"]
    train = ds["train"]
    assert train.num_rows == len(done)
    for col in ("image", "prompt", "revised_prompt", "model", "size", "quality", "sku", "note"):
        assert col in train.column_names
    got = {(r["job_id"], r["image_index"]): r for r in train}
    assert sorted(got) == sorted(zip(done.job_id, done.image_index.astype(int)))
    for row in done.itertuples():
        item = got[(row.job_id, int(row.image_index))]
        assert (item["prompt"], item["model"], item["sku"]) == (row.prompt, row.model, row.sku)
        assert item["image"].size == (int(row.width), int(row.height))
        assert item["sha256"] == hashlib.sha256((folder / row.file).read_bytes()).hexdigest()
        assert bool(item["revised_prompt"]) == (row.model == "dall-e-3")


# -- imagebatch report -------------------------------------------------------------------


def _snapshot(folder: Path, skip: set[str]) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] not in skip
    }


def test_report_summarizes_and_rebuilds(folder):
    page = (folder / "index.html").read_bytes()
    metadata = (folder / "metadata.jsonl").read_bytes()
    thumbs = _snapshot(folder / "thumbs", set())
    for name in ("index.html", "metadata.jsonl"):
        (folder / name).unlink()
    shutil.rmtree(folder / "thumbs")
    untouched = _snapshot(folder, {"index.html", "metadata.jsonl", "thumbs", ".imagebatch.lock"})

    result = invoke(["report", str(folder)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "succeeded" in out and "gpt-image-2" in out and "dall-e-3" in out
    assert "moderation" in out or "rejected" in out
    assert "images per minute" in out and "4 image(s) made" in out
    # the same page and metadata as the run wrote, and nothing else changed
    assert (folder / "index.html").read_bytes() == page
    assert (folder / "metadata.jsonl").read_bytes() == metadata
    assert _snapshot(folder / "thumbs", set()) == thumbs
    assert _snapshot(folder, {"index.html", "metadata.jsonl", "thumbs", ".imagebatch.lock"}) == (
        untouched
    )


def test_report_from_a_csv_only_manifest_writes_the_same_outputs(folder):
    page = (folder / "index.html").read_bytes()
    metadata = (folder / "metadata.jsonl").read_bytes()
    (folder / "manifest.parquet").unlink()  # [output] manifest_formats = ["csv"]
    result = invoke(["report", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "index.html").read_bytes() == page
    assert (folder / "metadata.jsonl").read_bytes() == metadata


def test_report_writes_a_contact_sheet_when_asked(folder):
    result = invoke(["report", str(folder), "--contact-sheet", "3"])
    assert result.exit_code == 0, result.output
    with Image.open(folder / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.width == 3 * (256 + 6) + 6


def test_report_refuses_a_folder_a_run_is_using(folder):
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = (folder / "index.html").read_bytes()
        (folder / "index.html").unlink()
        result = invoke(["report", str(folder)])
        assert result.exit_code == 2
        assert "in use by another imagebatch run" in result.output
        assert not (folder / "index.html").exists()
    finally:
        holder.communicate("", timeout=60)
    result = invoke(["report", str(folder)])
    assert result.exit_code == 0 and (folder / "index.html").read_bytes() == before


LOCK_HOLDER = """
import sys
from pathlib import Path
from imagebatch.tasks.outdir import FolderLock
with FolderLock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.mark.parametrize("make", ["missing", "empty", "not_a_run"])
def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, make):
    target = tmp_path / "x"
    if make != "missing":
        target.mkdir()
    if make == "not_a_run":
        (target / "manifest.csv").write_text("a,b\n1,2\n")
    result = invoke(["report", str(target)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "Error:" in result.output and "Traceback" not in result.output
    if make != "missing":
        assert sorted(p.name for p in target.iterdir()) == (
            ["manifest.csv"] if make == "not_a_run" else []
        )
