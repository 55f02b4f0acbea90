"""Gallery: `index.html`, one self-contained page with a card per requested image.

The page needs no network and no server: the manifest rows travel inside it as JSON in a
`<script type="application/json">` block, with `<`, `>` and `&` written as JSON escapes so
no cell can close the block, and the page's own script builds the cards with textContent.
A Content-Security-Policy meta tag allows only that script and stylesheet (by hash) and
images from the folder itself, so even a bug that let text become markup could not run it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

from imagebatch.tasks.files import write_atomic
from imagebatch.tasks.gallery_assets import CSS, JS
from imagebatch.tasks.manifest import Manifest

PAGE_NAME = "index.html"
# Columns the cards show, in this order; carried-through columns follow.
CARD_COLUMNS = [
    "job_id",
    "row",
    "image_index",
    "operation",
    "model",
    "prompt",
    "revised_prompt",
    "size",
    "quality",
    "style",
    "background",
    "output_format",
    "status",
    "error_code",
    "error_message",
    "file",
    "width",
    "height",
    "attempts",
]


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


# file: lets a page opened from disk show its own thumbnails in browsers whose 'self' does
# not cover file URLs; a page served over http cannot load file: URLs whatever it says.
CSP = "; ".join(
    [
        "default-src 'none'",
        f"script-src {_csp_hash(JS)}",
        f"style-src {_csp_hash(CSS)}",
        "img-src 'self' file:",
        "base-uri 'none'",
        "form-action 'none'",
    ]
)


def json_cell(value: Any) -> Any:
    """A manifest cell as JSON: missing values become null, numpy scalars plain numbers.

    An empty text is missing too: the CSV manifest cannot tell them apart, so the page and
    metadata come out the same whichever manifest they are built from."""
    pd = sys.modules.get("pandas")  # only a manifest read with pandas has its NA
    if value is None or (pd is not None and value is pd.NA) or value == "":
        return None
    if isinstance(value, float):
        return None if math.isnan(value) else (int(value) if value.is_integer() else value)
    if hasattr(value, "item"):  # numpy scalar
        return json_cell(value.item())
    return value if isinstance(value, int | str | bool) else str(value)


def safe_relative(path: Any, folder: str) -> str | None:
    """Only plain `folder/name` paths become links: nothing absolute, no `..`, no scheme."""
    if not isinstance(path, str):
        return None
    parts = path.split("/")
    if len(parts) != 2 or parts[0] != folder or parts[1] in ("", ".", "..") or "\\" in path:
        return None
    return path


def page_data(
    manifest: Manifest, extra: list[str], thumbs: dict[str, str], title: str, summary: str
) -> dict[str, Any]:
    """The JSON the page embeds: column names once, then one array per manifest row."""
    columns = [c for c in CARD_COLUMNS if c in manifest.columns] + [
        c for c in extra if c in manifest.columns and c not in CARD_COLUMNS
    ]
    rows = []
    for record in manifest.rows:
        row = [json_cell(record.get(c)) for c in columns]
        file = safe_relative(row[columns.index("file")], "images")
        row[columns.index("file")] = file
        row.append(safe_relative(thumbs.get(file or ""), "thumbs"))
        rows.append(row)
    return {
        "title": title,
        "summary": summary,
        "columns": [*columns, "thumb"],
        "extra": [c for c in columns if c not in CARD_COLUMNS],
        "rows": rows,
    }


def embed_json(data: Any) -> str:
    """JSON that is safe inside a <script> element: no `<`, `>` or `&` survives literally."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render_page(data: dict[str, Any]) -> str:
    title = html.escape(str(data.get("title", "imagebatch")))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{html.escape(CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>{CSS}</style>
</head>
<body>
<header><h1 id="title"></h1><div class="summary" id="summary"></div></header>
<nav class="controls">
<input type="search" id="q" placeholder="Search prompts, revised prompts, errors, ids, columns" aria-label="search">
<select id="status" aria-label="status"></select>
<select id="model" aria-label="model"></select>
<span class="pager"><span id="count"></span>
<button type="button" id="prev">&larr;</button><span id="page"></span><button type="button" id="next">&rarr;</button></span>
</nav>
<main id="cards"></main>
<script type="application/json" id="gallery-data">{embed_json(data)}</script>
<script>{JS}</script>
</body>
</html>
"""


def write_page(
    out_dir: Path,
    manifest: Manifest,
    extra: list[str],
    thumbs: dict[str, str],
    summary: str,
) -> Path:
    """Write `index.html` atomically; returns its path."""
    data = page_data(manifest, extra, thumbs, f"imagebatch: {out_dir.name}", summary)
    path = out_dir / PAGE_NAME
    write_atomic(path, render_page(data).encode("utf-8"))
    return path
