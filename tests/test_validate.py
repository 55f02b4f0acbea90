"""Every validation rule: a bad row names its row, column and rule; good rows pass untouched."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from imagebatch.configs.registry import Registry, parse_size
from imagebatch.configs.settings import JobDefaults
from imagebatch.tasks.errors import InputError
from imagebatch.tasks.read_jobs import JOB_COLUMNS, read_jobs
from imagebatch.tasks.validate import Validator

TODAY = dt.date(2026, 11, 28)


def check(
    rows: list[dict],
    *,
    openai: bool = False,
    base_dir: Path | None = None,
    strict_models: bool = False,
    registry: Registry | None = None,
    **defaults,
):
    validator = Validator(
        registry or Registry.load(),
        JobDefaults(**defaults),
        targets_openai=openai,
        base_dir=base_dir,
        today=TODAY,
        strict_models=strict_models,
    )
    return validator.check(read_jobs(pd.DataFrame(rows)))


def errors(rows, **kw) -> list[tuple[int, str, str]]:
    checked = check(rows, **kw)
    return [(p.row, p.column, p.message) for ps in checked.invalid.values() for p in ps]


def one_error(row: dict, column: str, fragment: str, **kw) -> None:
    errs = errors([row], **kw)
    assert any(c == column and fragment in m for _, c, m in errs), errs
    assert all(r == 1 for r, _, _ in errs)


def test_valid_rows_pass_with_the_params_to_send():
    checked = check(
        [
            {
                "prompt": "a cat",
                "model": "gpt-image-2",
                "size": "1536x1024",
                "quality": "high",
                "n": "3",
                "output_format": "webp",
                "output_compression": "80",
            },
            {
                "prompt": "a dog",
                "model": "dall-e-3",
                "size": "1792x1024",
                "quality": "hd",
                "style": "natural",
            },
        ]
    )
    assert not checked.invalid
    gpt, dalle = checked.valid
    assert gpt.params == {
        "model": "gpt-image-2",
        "prompt": "a cat",
        "size": "1536x1024",
        "quality": "high",
        "output_format": "webp",
        "output_compression": 80,
    }
    assert gpt.n == 3
    assert dalle.params["response_format"] == "b64_json"
    assert dalle.params["style"] == "natural"
    assert "response_format" not in gpt.params


def test_empty_cells_take_defaults_and_model_defaults():
    checked = check([{"prompt": "a cat", "model": ""}], model="gpt-image-1.5")
    (job,) = checked.valid
    assert job.params["model"] == "gpt-image-1.5"
    assert job.params["size"] == "1024x1024"
    assert job.params["quality"] == "auto"
    assert job.n == 1


@pytest.mark.parametrize(
    "row, column, fragment",
    [
        ({"prompt": "", "model": "gpt-image-2"}, "prompt", "prompt is empty"),
        ({"prompt": "x" * 4001, "model": "dall-e-3"}, "prompt", "at most 4000"),
        ({"prompt": "x" * 1001, "model": "dall-e-2"}, "prompt", "at most 1000"),
        ({"prompt": "x", "model": "dall-e-3", "size": "512x512"}, "size", "offers sizes"),
        ({"prompt": "x", "model": "gpt-image-1", "size": "1792x1024"}, "size", "offers sizes"),
        ({"prompt": "x", "model": "gpt-image-2", "size": "1000x1000"}, "size", "multiples of 16"),
        ({"prompt": "x", "model": "gpt-image-2", "size": "3200x800"}, "size", "aspect ratio"),
        ({"prompt": "x", "model": "gpt-image-2", "size": "4096x2048"}, "size", "longest edge"),
        ({"prompt": "x", "model": "gpt-image-2", "size": "512x512"}, "size", "total pixels"),
        ({"prompt": "x", "model": "gpt-image-2", "size": "big"}, "size", "WxH"),
        ({"prompt": "x", "model": "gpt-image-2", "quality": "hd"}, "quality", "offers quality"),
        ({"prompt": "x", "model": "dall-e-3", "quality": "high"}, "quality", "offers quality"),
        ({"prompt": "x", "model": "gpt-image-2", "n": "0"}, "n", "at least 1"),
        ({"prompt": "x", "model": "gpt-image-2", "n": "11"}, "n", "at most 10"),
        ({"prompt": "x", "model": "gpt-image-2", "n": "2.5"}, "n", "whole number"),
        ({"prompt": "x", "model": "gpt-image-2", "n": "many"}, "n", "whole number"),
        (
            {"prompt": "x", "model": "gpt-image-2", "style": "vivid"},
            "style",
            "does not accept 'style'",
        ),
        (
            {"prompt": "x", "model": "dall-e-3", "output_format": "png"},
            "output_format",
            "does not accept",
        ),
        (
            {"prompt": "x", "model": "dall-e-3", "background": "opaque"},
            "background",
            "does not accept",
        ),
        (
            {"prompt": "x", "model": "dall-e-3", "moderation": "low"},
            "moderation",
            "does not accept",
        ),
        (
            {"prompt": "x", "model": "gpt-image-2", "response_format": "url"},
            "response_format",
            "does not accept",
        ),
        ({"prompt": "x", "model": "dall-e-3", "style": "loud"}, "style", "must be one of"),
        (
            {"prompt": "x", "model": "gpt-image-2", "output_format": "gif"},
            "output_format",
            "must be one of",
        ),
        (
            {
                "prompt": "x",
                "model": "gpt-image-2",
                "output_compression": "101",
                "output_format": "jpeg",
            },
            "output_compression",
            "0 to 100",
        ),
        (
            {"prompt": "x", "model": "gpt-image-2", "output_compression": "50"},
            "output_compression",
            "only with output_format jpeg or webp",
        ),
        (
            {
                "prompt": "x",
                "model": "gpt-image-1",
                "background": "transparent",
                "output_format": "jpeg",
            },
            "background",
            "png or webp",
        ),
        (
            {"prompt": "x", "model": "gpt-image-2", "background": "transparent"},
            "background",
            "not confirmed",
        ),
        (
            {"prompt": "x", "model": "gpt-image-1", "input_fidelity": "high"},
            "input_fidelity",
            "edits only",
        ),
        (
            {"prompt": "x", "model": "gpt-image-2", "operation": "paint"},
            "operation",
            "unknown operation",
        ),
        (
            {"prompt": "x", "model": "dall-e-3", "operation": "edit", "image": "a.png"},
            "operation",
            "does not serve 'edit'",
        ),
        (
            {"prompt": "x", "model": "gpt-image-2", "operation": "variation", "image": "a.png"},
            "operation",
            "does not serve 'variation'",
        ),
        (
            {"prompt": "x", "model": "gpt-image-2", "operation": "edit"},
            "image",
            "needs a source image",
        ),
        (
            {"prompt": "x", "model": "gpt-image-2", "operation": "edit", "image": "missing.png"},
            "image",
            "file not found",
        ),
        (
            {"prompt": "x", "model": "gpt-image-2", "image": "a.png"},
            "image",
            "only used by edit and variation",
        ),
        (
            {
                "prompt": "x",
                "model": "gpt-image-2",
                "operation": "edit",
                "image": "https://example.com/a.png",
            },
            "image",
            "only local file paths",
        ),
    ],
)
def test_rule(row, column, fragment):
    one_error(row, column, fragment)


@pytest.mark.parametrize(
    "size, parsed",
    [
        ("1536x1024", (1536, 1024)),
        ("0x1024", (0, 1024)),  # the registry refuses it with its own reason
        ("auto", None),
        ("", None),
        ("1536X1024", None),  # validation lower-cases before anything parses
        (" 1536x1024", None),
        ("123456x1", None),
        ("\u0661\u0660x10", None),  # digits, but not ASCII ones
    ],
)
def test_one_size_parser_for_every_stage(size, parsed):
    assert parse_size(size) == parsed


def test_retired_model_is_an_error_only_against_openai():
    row = {"prompt": "x", "model": "dall-e-3"}
    one_error(row, "model", "retired on api.openai.com on 2026-05-12", openai=True)
    checked = check([row], openai=False)
    assert checked.valid and not checked.invalid
    assert [(w.column, w.severity) for w in checked.warnings] == [("model", "warning")]


def test_model_retiring_soon_is_a_warning():
    checked = check([{"prompt": "x", "model": "gpt-image-1.5"}], openai=True)
    assert checked.valid
    assert "retires on api.openai.com on 2026-12-01" in checked.warnings[0].message


def test_per_job_cap_is_configurable():
    one_error({"prompt": "x", "model": "gpt-image-2", "n": "5"}, "n", "at most 4", max_n_per_job=4)


def test_duplicate_ids_are_refused_and_others_run():
    checked = check(
        [
            {"id": "A", "prompt": "x", "model": "gpt-image-2"},
            {"id": "A", "prompt": "y", "model": "gpt-image-2"},
            {"id": "B", "prompt": "z", "model": "gpt-image-2"},
        ]
    )
    assert sorted(checked.invalid) == [2]
    assert "already used by row 1" in checked.invalid[2][0].message
    assert [j.job_id for j in checked.valid] == ["A", "B"]


def test_a_bad_row_does_not_stop_the_others():
    checked = check(
        [
            {"prompt": "ok", "model": "gpt-image-2"},
            {"prompt": "bad", "model": "gpt-image-2", "size": "1x1"},
            {"prompt": "ok too", "model": "gpt-image-2"},
        ]
    )
    assert [j.job.row for j in checked.valid] == [1, 3]
    assert list(checked.invalid) == [2]
    assert str(checked.invalid[2][0]).startswith("row 2, column 'size'")


def test_run_default_that_the_model_cannot_take_is_not_sent():
    checked = check([{"prompt": "x", "model": "dall-e-3"}], output_format="webp")
    assert checked.valid and "output_format" not in checked.valid[0].params


def test_run_default_size_is_checked_and_named(tmp_path):
    errs = errors([{"prompt": "x", "model": "dall-e-3"}], size="256x256")
    assert errs and errs[0][1] == "size" and "(from the run default)" in errs[0][2]


def _png(path: Path, size=(64, 64), mode="RGB", fmt="PNG") -> Path:
    Image.new(mode, size, (10, 20, 30) if mode == "RGB" else (10, 20, 30, 0)).save(path, fmt)
    return path


def test_edit_sources_and_masks(tmp_path):
    """What preparation can fix passes; what it cannot (shape, count, fit=error) is refused."""
    _png(tmp_path / "src.png", (64, 64))
    _png(tmp_path / "wide.png", (96, 64))
    _png(tmp_path / "photo.jpg", (64, 64), fmt="JPEG")
    _png(tmp_path / "mask.png", (64, 64), mode="RGBA")
    _png(tmp_path / "flat_mask.png", (64, 64))
    _png(tmp_path / "odd_mask.png", (64, 40), mode="RGBA")
    ok = check(
        [
            {
                "prompt": "x",
                "model": "gpt-image-2",
                "operation": "edit",
                "image": "src.png|photo.jpg",
                "mask": "mask.png",
            }
        ],
        base_dir=tmp_path,
    )
    assert ok.valid and [s.format for s in ok.valid[0].images] == ["png", "jpeg"]
    # Prepared instead of refused: a black-and-white mask, a JPEG mask, a wide or JPEG
    # source for dall-e-2 (padded for edits, cropped for variations).
    fixable = [
        {"prompt": "x", "model": "gpt-image-2", "operation": "edit", "image": "src.png", "mask": m}
        for m in ("flat_mask.png", "photo.jpg")
    ] + [
        {"prompt": "x", "model": "dall-e-2", "operation": "edit", "image": "wide.png"},
        {"prompt": "x", "model": "dall-e-2", "operation": "edit", "image": "photo.jpg"},
        {"model": "dall-e-2", "operation": "variation", "image": "wide.png"},
    ]
    fixed = check(fixable, base_dir=tmp_path)
    assert not fixed.invalid, fixed.problems
    assert [v.prep.fit for v in fixed.valid[2:]] == ["pad", "pad", "crop"]
    one_error(
        {
            "prompt": "x",
            "model": "gpt-image-2",
            "operation": "edit",
            "image": "src.png",
            "mask": "odd_mask.png",
        },
        "mask",
        "cannot be matched",
        base_dir=tmp_path,
    )
    one_error(
        {
            "prompt": "x",
            "model": "dall-e-2",
            "operation": "edit",
            "image": "wide.png",
            "fit": "error",
        },
        "image",
        "needs a square image and fit is 'error'",
        base_dir=tmp_path,
    )
    one_error(
        {"prompt": "x", "model": "dall-e-2", "operation": "edit", "image": "src.png", "fit": "x"},
        "fit",
        "crop, pad or error",
        base_dir=tmp_path,
    )
    one_error(
        {"prompt": "x", "model": "dall-e-2", "operation": "edit", "image": "src.png|src.png"},
        "image",
        "at most 1",
        base_dir=tmp_path,
    )
    too_many = "|".join(["src.png"] * 17)
    one_error(
        {"prompt": "x", "model": "gpt-image-2", "operation": "edit", "image": too_many},
        "image",
        "at most 16",
        base_dir=tmp_path,
    )
    one_error({"prompt": "x", "model": "gpt-image-2", "fit": "crop"}, "fit", "only used by")
    var = check(
        [{"model": "dall-e-2", "operation": "variation", "image": "src.png"}], base_dir=tmp_path
    )
    assert var.valid and "prompt" not in var.valid[0].params


def test_reader_handles_bom_quoted_newlines_and_carries_unknown_columns(tmp_path):
    path = tmp_path / "jobs.csv"
    path.write_bytes(
        '\ufeffsku,prompt,model,n\n007,"a cat\non two lines",gpt-image-2,2\n'.encode("utf-8")
    )
    (job,) = read_jobs(path)
    assert job.get("prompt") == "a cat\non two lines"
    assert job.extra == {"sku": "007"}
    assert job.get("n") == "2"


TRICKY_CSVS = {
    "blank lines": "prompt,sku\na,1\n\n   \n\tb,2\n\n",
    "short rows": "prompt,sku,size\na,1\nb\n",
    "a row of empty cells": 'prompt,sku\n""\n,\nc,3\n',
    "CR endings": "prompt,sku\ra,1\rb,2\r",
    "CRLF, quoted newline": 'prompt,sku\r\n"a\r\nb",1\r\n',
    "trailing comma": "prompt,sku,\na,1,\n",
    "quote inside a cell": 'prompt,sku\nsay "hi",1\n',
    "blank first line": "\nprompt,sku\n a ,\u00e9\n",
}


@pytest.mark.parametrize("name", sorted(TRICKY_CSVS))
def test_the_csv_reader_reads_what_pandas_reads(tmp_path, name):
    """CSVs are read without pandas (start-up); they must read as pandas read them."""
    path = tmp_path / "jobs.csv"
    path.write_bytes(TRICKY_CSVS[name].encode("utf-8"))
    raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    header, rows = list(raw.iloc[0]), raw.iloc[1:].values.tolist()
    columns = [c or f"column_{i}" for i, c in enumerate(header, start=1)]
    expected = [[v.strip() if c in JOB_COLUMNS else v for c, v in zip(columns, r)] for r in rows]
    jobs = read_jobs(path)
    got = [[j.get(c) if c in JOB_COLUMNS else j.extra[c] for c in columns] for j in jobs]
    assert got == expected and expected
    assert [j.row for j in jobs] == list(range(1, len(rows) + 1))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prompt,n\na,1\nb,2,3\n", "row 2 (line 3) has 3 cells, the header 2"),
        ('prompt,n\na,1\n"b,2\n', "line 3"),
    ],
)
def test_a_malformed_csv_is_refused_naming_where(tmp_path, text, message):
    path = tmp_path / "jobs.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(message)):
        read_jobs(path)


def test_reader_reads_parquet(tmp_path):
    path = tmp_path / "jobs.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "n": [1, 2], "sku": ["x", None]}).to_parquet(path)
    jobs = read_jobs(path)
    assert [j.get("n") for j in jobs] == ["1", "2"]
    assert jobs[1].extra == {"sku": None}


def test_unknown_model_is_refused_with_strict_models():
    errs = errors([{"prompt": "x", "model": "dall-e-9"}], strict_models=True)
    assert [(r, c) for r, c, _ in errs] == [(1, "model")]
    assert "unknown model 'dall-e-9'" in errs[0][2] and "strict_models" in errs[0][2]


def test_current_models_take_xhigh_max_free_sizes_and_transparency():
    for model in ("gpt-image-2.5-flare", "gpt-image-2.5-sunburst"):
        for quality in ("low", "medium", "high", "xhigh", "max", "auto"):
            checked = check(
                [
                    {
                        "prompt": "x",
                        "model": model,
                        "quality": quality,
                        "size": "2048x1152",
                        "background": "transparent",
                        "output_format": "webp",
                    }
                ]
            )
            assert not checked.invalid, checked.problems
            assert checked.valid[0].params["quality"] == quality
        one_error({"prompt": "x", "model": model, "size": "1000x1000"}, "size", "multiples of 16")
        one_error({"prompt": "x", "model": model, "quality": "ultra"}, "quality", "xhigh, max")
        one_error(
            {"prompt": "x", "model": model, "operation": "variation", "image": "a.png"},
            "operation",
            "does not serve 'variation'",
        )
    # xhigh is a 2.5 quality, not a gpt-image-2 one
    one_error({"prompt": "x", "model": "gpt-image-2", "quality": "xhigh"}, "quality", "offers")


def test_dated_snapshot_has_its_base_rules_and_keeps_its_name():
    checked = check(
        [
            {"prompt": "x", "model": "gpt-image-2-2026-04-21", "size": "1280x720"},
            {"prompt": "x", "model": "gpt-image-2.5-flare-2026-09-08", "quality": "xhigh"},
            {"prompt": "x", "model": "gpt-image-2-2026-04-21", "size": "1000x1000"},
        ]
    )
    assert [v.params["model"] for v in checked.valid] == [
        "gpt-image-2-2026-04-21",
        "gpt-image-2.5-flare-2026-09-08",
    ]
    assert [v.model.base for v in checked.valid] == ["gpt-image-2", "gpt-image-2.5-flare"]
    assert all(v.model.checked for v in checked.valid)
    assert "multiples of 16" in checked.invalid[3][0].message
    assert not checked.warnings  # a snapshot is not an unknown model


def test_snapshot_of_a_retired_model_is_retired_too():
    errs = errors([{"prompt": "x", "model": "dall-e-3-2024-01-01"}], openai=True)
    assert [(c, "retired" in m) for _, c, m in errs] == [("model", True)]


def test_unknown_models_are_sent_unchecked_with_one_warning_per_model(tmp_path):
    Image.new("RGB", (300, 200)).save(tmp_path / "src.jpg")
    rows = [
        {"prompt": "a", "model": "gpt-image-9", "quality": "ultra", "size": "777x333", "n": "3"},
        {"prompt": "b", "model": "gpt-image-9", "output_format": "gif", "style": "anything"},
        {"prompt": "c", "model": "acme-pix", "operation": "edit", "image": "src.jpg"},
        {"prompt": "", "model": "gpt-image-9"},
        {"prompt": "e", "model": "acme-pix", "n": "11"},
        {"prompt": "f", "model": "acme-pix", "n": "two"},
        {"prompt": "g", "model": "acme-pix", "output_compression": "high"},
        {"prompt": "h", "model": "acme-pix", "operation": "edit", "image": "missing.png"},
    ]
    checked = check(rows, base_dir=tmp_path)
    valid = {v.job.row: v for v in checked.valid}
    assert sorted(valid) == [1, 2, 3]
    # what the row says is sent as it is, nothing added from a registry entry
    assert valid[1].params == {
        "model": "gpt-image-9",
        "prompt": "a",
        "quality": "ultra",
        "size": "777x333",
    }
    assert valid[1].n == 3 and valid[1].model.max_n_per_call == 1
    assert valid[2].params["output_format"] == "gif" and valid[2].params["style"] == "anything"
    assert valid[3].images[0].format == "jpeg"
    assert not valid[1].model.checked
    # model-independent rules still hold
    assert [(r, ps[0].column) for r, ps in sorted(checked.invalid.items())] == [
        (4, "prompt"),
        (5, "n"),
        (6, "n"),
        (7, "output_compression"),
        (8, "image"),
    ]
    warnings = [w for w in checked.warnings if w.column == "model"]
    assert [(w.row, w.severity) for w in warnings] == [(1, "warning"), (3, "warning")]
    assert "'gpt-image-9' is not in the model registry: 3 row(s) (1, 2, 4)" in warnings[0].message
    assert "sent unchecked" in warnings[0].message and "--models" in warnings[0].message
    assert "--strict-models" in warnings[1].message


def test_overlay_registry_adds_a_model_with_its_own_rules(tmp_path, monkeypatch):
    overlay = tmp_path / "mine.toml"
    overlay.write_text(
        """
[models."acme-pix-1"]
endpoints = ["generate"]
max_n_per_call = 2
sizes = ["640x480", "1280x960"]
qualities = ["draft", "final"]
params = ["output_format"]
response_format = "b64_json"
prompt_max = 100
default_size = "640x480"
default_quality = "draft"
""",
        encoding="utf-8",
    )
    for registry in (Registry.load(overlay), _env_registry(monkeypatch, overlay)):
        checked = check(
            [
                {"prompt": "x", "model": "acme-pix-1", "quality": "final", "n": "5"},
                {"prompt": "x", "model": "acme-pix-1", "size": "1024x1024"},
                {"prompt": "x" * 101, "model": "acme-pix-1"},
                {"prompt": "x", "model": "acme-pix-1", "background": "opaque"},
            ],
            registry=registry,
        )
        assert not checked.warnings
        ok = checked.valid[0]
        assert ok.params == {
            "model": "acme-pix-1",
            "prompt": "x",
            "size": "640x480",
            "quality": "final",
        }
        assert ok.model.max_n_per_call == 2
        assert {r: ps[0].column for r, ps in checked.invalid.items()} == {
            2: "size",
            3: "prompt",
            4: "background",
        }
    assert registry.get("gpt-image-2") is not None  # the bundled models stay


def _env_registry(monkeypatch, path: Path) -> Registry:
    monkeypatch.setenv("IMAGEBATCH_MODELS", str(path))
    return Registry.load()


def test_moderation_is_not_sent_on_edits_unless_the_registry_says_so(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "src.png")
    row = {
        "prompt": "x",
        "model": "gpt-image-2.5-sunburst",
        "operation": "edit",
        "image": "src.png",
        "moderation": "low",
    }
    checked = check([row, {**row, "operation": "generate", "image": ""}], base_dir=tmp_path)
    edit, generate = checked.valid
    assert "moderation" not in edit.params and generate.params["moderation"] == "low"
    assert [(w.row, w.column) for w in checked.warnings] == [(1, "moderation")]
    overlay = tmp_path / "m.toml"
    overlay.write_text(
        '[models."gpt-image-2.5-sunburst"]\n'
        'edit_params = ["moderation", "output_format", "background", "user"]\n',
        encoding="utf-8",
    )
    checked = check([row], base_dir=tmp_path, registry=Registry.load(overlay))
    assert checked.valid[0].params["moderation"] == "low" and not checked.warnings


def test_deployment_comes_from_the_row_the_config_map_or_the_model():
    validator = Validator(
        Registry.load(),
        JobDefaults(),
        targets_openai=False,
        today=TODAY,
        deployments={"gpt-image-2": "img-prod", "gpt-image-2.5-flare": "flare-eu"},
    )
    rows = [
        {"prompt": "x", "model": "gpt-image-2"},
        {"prompt": "x", "model": "gpt-image-2", "deployment": "img-canary"},
        {"prompt": "x", "model": "gpt-image-2.5-flare-2026-09-08"},
        {"prompt": "x", "model": "gpt-image-2.5-sunburst"},
        {"prompt": "x", "model": "house-model"},
    ]
    checked = validator.check(read_jobs(pd.DataFrame(rows)))
    assert [v.deployment for v in checked.valid] == [
        "img-prod",
        "img-canary",
        "flare-eu",
        "gpt-image-2.5-sunburst",
        "house-model",
    ]
