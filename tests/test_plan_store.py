"""Planning (keys, n-splitting) and storing (decode, atomic writes)."""

from __future__ import annotations

import errno
import io
import os
import random

import pandas as pd
import pytest
from PIL import Image

from imagebatch.configs.registry import Registry
from imagebatch.configs.settings import JobDefaults
from imagebatch.tasks.errors import OutputError
from imagebatch.tasks.plan import plan_jobs, safe_name, units_for
from imagebatch.tasks.read_jobs import read_jobs
from imagebatch.tasks.store import (
    CorruptImage,
    Expected,
    ImageStore,
    StoredImage,
    UnexpectedImage,
    check_image,
)
from imagebatch.tasks.validate import Validator


def planned(rows: list[dict]):
    checked = Validator(Registry.load(), JobDefaults(), targets_openai=False).check(
        read_jobs(pd.DataFrame(rows))
    )
    assert not checked.invalid, checked.problems
    return plan_jobs(checked.valid)


def test_dalle3_n4_becomes_four_single_image_calls():
    (job,) = planned([{"prompt": "a cat", "model": "dall-e-3", "n": "4"}])
    units = list(units_for(job, range(4)))
    assert [u.indices for u in units] == [(0,), (1,), (2,), (3,)]
    assert len({u.key for u in units}) == 4


def test_gpt_image_n_is_split_by_max_per_call():
    (job,) = planned([{"prompt": "a cat", "model": "gpt-image-2", "n": "10"}])
    assert [u.n for u in units_for(job, range(10))] == [10]
    (job,) = planned([{"prompt": "a cat", "model": "gpt-image-2", "n": "3"}])
    assert [u.indices for u in units_for(job, [2, 0])] == [(0, 2)]


def test_keys_survive_reordering_and_appending():
    rows = [
        {"prompt": "a", "model": "gpt-image-2"},
        {"prompt": "b", "model": "dall-e-3", "n": "2"},
        {"id": "X", "prompt": "c", "model": "gpt-image-2"},
    ]
    before = {p.job_id: p.keys for p in planned(rows)}
    after = {
        p.job_id: p.keys
        for p in planned([{"prompt": "new", "model": "gpt-image-2"}, rows[2], rows[1], rows[0]])
    }
    for job_id, keys in before.items():
        assert after[job_id] == keys


def test_keys_change_with_what_shapes_the_image():
    base = {"prompt": "a", "model": "gpt-image-2", "size": "1024x1024"}
    k0 = planned([base])[0].keys[0]
    assert planned([{**base, "size": "1536x1024"}])[0].keys[0] != k0
    assert planned([{**base, "prompt": "b"}])[0].keys[0] != k0
    assert planned([{**base, "quality": "high"}])[0].keys[0] != k0
    # `user` does not change the picture, so it does not change the key
    assert planned([{**base, "user": "someone"}])[0].keys[0] == k0


def test_identical_rows_are_distinct_jobs():
    a, b = planned(
        [{"prompt": "same", "model": "gpt-image-2"}, {"prompt": "same", "model": "gpt-image-2"}]
    )
    assert a.job_id != b.job_id
    assert set(a.keys).isdisjoint(b.keys)


@pytest.mark.parametrize("job_id", ["a/b", "A", "con", "..", "x" * 300, "猫", "a b?c*"])
def test_safe_names(job_id):
    name = safe_name(job_id)
    assert name and len(name) <= 100
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    assert not name.startswith(".")


def test_safe_names_do_not_collide():
    ids = ["a/b", "a_b", "A_B", "a?b"]
    assert len({safe_name(i) for i in ids}) == len(ids)


def _png_bytes(size=(32, 16), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, fmt)
    return buf.getvalue()


def save(store: ImageStore, data: bytes, name: str) -> StoredImage:
    """Check and write `images/<name>.<ext>` as a run does: staged, then committed."""
    stored = store.stage(data, name)
    store.commit(stored)
    return stored


def test_store_decodes_and_names_by_real_format(tmp_path):
    store = ImageStore(tmp_path)
    store.prepare()
    stored = save(store, _png_bytes(fmt="JPEG"), "job_3")
    assert stored.file == "images/job_3.jpg"
    assert (stored.width, stored.height) == (32, 16)
    assert store.verify(stored.file, stored.sha256)
    (tmp_path / stored.file).write_bytes(b"tampered")
    assert not store.verify(stored.file, stored.sha256)


def test_store_refuses_undecodable_bytes(tmp_path):
    store = ImageStore(tmp_path)
    store.prepare()
    truncated = _png_bytes((256, 256))[:200]
    with pytest.raises(CorruptImage):
        save(store, truncated, "job_0")
    with pytest.raises(CorruptImage):
        check_image(b"not an image")
    assert list((tmp_path / "images").iterdir()) == []


def test_write_is_atomic_and_disk_full_leaves_nothing(tmp_path, monkeypatch):
    store = ImageStore(tmp_path)
    store.prepare()
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="disk is full"):
        save(store, _png_bytes(), "job_0")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert list((tmp_path / "images").iterdir()) == []


def test_leftovers_are_cleared_only_from_the_tools_own_staging_folder(tmp_path):
    (tmp_path / "images").mkdir()
    theirs = tmp_path / "images" / ".tmp-job_0.png.abcd"  # a name like ours, not in a journal
    theirs.write_bytes(b"half")
    store = ImageStore(tmp_path)
    store.prepare()
    (store.staging_dir / "job_0.png.1234").write_bytes(b"half")
    store.clear_staging()
    assert theirs.read_bytes() == b"half"
    assert list(store.staging_dir.iterdir()) == []


def test_vanished_folder_is_an_output_error(tmp_path):
    store = ImageStore(tmp_path / "out")
    store.prepare()
    (tmp_path / "out" / "images").rmdir()
    with pytest.raises(OutputError, match="vanished"):
        save(store, _png_bytes(), "job_0")


def test_file_stems_are_unique_per_job_even_when_ids_clean_alike():
    from imagebatch.tasks.plan import safe_name

    literal = safe_name("A B")  # "a_b-<hash>", itself a legal id
    jobs = planned(
        [
            {"id": "A B", "prompt": "x", "model": "gpt-image-2"},
            {"id": literal, "prompt": "y", "model": "gpt-image-2"},
            {"prompt": "z", "model": "gpt-image-2"},
        ]
    )
    derived = jobs[2].job_id  # an explicit id equal to another row's derived id
    jobs += planned(
        [
            {"prompt": "z", "model": "gpt-image-2"},
            {"id": derived, "prompt": "w", "model": "gpt-image-2"},
        ]
    )[1:]
    stems = [p.file_stem for p in jobs]
    assert len(set(stems)) == len(stems), stems


def test_manifest_csv_neutralises_server_text_and_parquet_keeps_it(tmp_path):
    from imagebatch.tasks.manifest import Manifest, write_manifest

    raw = '=HYPERLINK("http://x")\x07\x1b[31m'
    rows = [
        {
            "job_id": "a",
            "row": 1,
            "image_index": 0,
            "status": "failed",
            "revised_prompt": raw,
            "error_message": "@SUM(1)",
            "error_code": "-1+1",
            "request_id": "+cmd",
            "prompt": "=1+1",
        },
    ]
    write_manifest(Manifest.build(rows, []), tmp_path)
    csv = pd.read_csv(tmp_path / "manifest.csv")
    assert csv.revised_prompt[0] == '\'=HYPERLINK("http://x")[31m'
    assert csv.error_message[0] == "'@SUM(1)" and csv.error_code[0] == "'-1+1"
    assert csv.request_id[0] == "'+cmd"
    assert pd.read_parquet(tmp_path / "manifest.parquet").revised_prompt[0] == raw


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_cut_image_is_not_whole_in_any_stored_format(tmp_path, fmt):
    # Noise, so that the cut lands in the compressed data, not in padding.
    noise = Image.frombytes("RGB", (128, 128), random.Random(0).randbytes(128 * 128 * 3))
    buf = io.BytesIO()
    noise.save(buf, fmt)
    whole = buf.getvalue()
    assert check_image(whole)[0] == fmt
    for cut in (len(whole) // 2, len(whole) - 4):
        with pytest.raises(CorruptImage):
            check_image(whole[:cut])


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
def test_formats_the_api_never_returns_are_not_stored(tmp_path, fmt):
    store = ImageStore(tmp_path)
    store.prepare()
    with pytest.raises(UnexpectedImage) as info:
        save(store, _png_bytes(fmt=fmt), "job_0")
    assert info.value.code == "unexpected_image_format"
    assert list((tmp_path / "images").iterdir()) == []


def test_what_was_asked_for_is_what_is_stored(tmp_path):
    png = _png_bytes((32, 16))
    assert Expected.of({"size": "auto"}) == Expected()
    assert Expected.of({"size": "", "output_format": "jpg"}) == Expected("JPEG", None)
    assert check_image(png, Expected.of({"size": "32x16", "output_format": "png"}))
    with pytest.raises(UnexpectedImage, match="asked for 16x32") as info:
        check_image(png, Expected.of({"size": "16x32"}))
    assert info.value.code == "unexpected_image_size"
    with pytest.raises(UnexpectedImage, match="asked for WEBP") as info:
        check_image(png, Expected.of({"output_format": "webp"}))
    assert info.value.code == "unexpected_image_format"


def test_the_hash_is_of_the_bytes_written(tmp_path):
    from imagebatch.tasks.files import file_sha256

    store = ImageStore(tmp_path)
    store.prepare()
    data = _png_bytes((700, 700))
    stored = save(store, data, "job_0")
    assert stored.sha256 == file_sha256(tmp_path / stored.file)
    assert (tmp_path / stored.file).read_bytes() == data


def test_a_flipped_bit_in_a_png_is_caught_by_its_chunk_checksum():
    noise = Image.frombytes("RGB", (64, 64), random.Random(1).randbytes(64 * 64 * 3))
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    damaged = bytearray(buf.getvalue())
    damaged[len(damaged) // 2] ^= 0x10  # inside the IDAT data
    with pytest.raises(CorruptImage):
        check_image(bytes(damaged))
    assert check_image(buf.getvalue() + b"\n") == ("PNG", 64, 64)  # trailing newline: whole
