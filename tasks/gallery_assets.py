"""The gallery page's own stylesheet and script (inline in index.html, allowed by hash).

The script reads the rows from a JSON data block and builds every card with
createElement/textContent: no text from the jobs file or the server is ever parsed as
HTML. Cards are rendered one page at a time and thumbnails load lazily, so 10,000 rows
cost one JSON.parse and at most PAGE cards in the DOM.
"""

from __future__ import annotations

CSS = """
:root { color-scheme: light dark; --bg:#f6f6f4; --fg:#1d1d1b; --card:#fff; --muted:#6b6b66;
  --line:#deded8; --ok:#1f7a3a; --bad:#b3261e; --warn:#9a6700; --off:#5f6368; }
@media (prefers-color-scheme: dark) { :root { --bg:#161615; --fg:#e8e8e3; --card:#222220;
  --muted:#a3a39b; --line:#3a3a36; } }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, sans-serif; background:var(--bg); color:var(--fg); }
header { padding:16px 20px 8px; }
h1 { font-size:18px; margin:0 0 4px; word-break:break-all; }
.summary { color:var(--muted); }
.controls { position:sticky; top:0; z-index:1; display:flex; flex-wrap:wrap; gap:8px;
  align-items:center; padding:8px 20px; background:var(--bg); border-bottom:1px solid var(--line); }
.controls input[type=search] { flex:1 1 240px; min-width:160px; padding:6px 8px; }
.controls select, .controls button, .controls input { font:inherit; }
.pager { display:flex; gap:6px; align-items:center; margin-left:auto; }
main { display:grid; grid-template-columns:repeat(auto-fill, minmax(260px, 1fr)); gap:14px;
  padding:16px 20px 40px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; overflow:hidden;
  display:flex; flex-direction:column; }
.thumb { display:flex; align-items:center; justify-content:center; height:260px;
  background:repeating-conic-gradient(#8881 0 25%, transparent 0 50%) 0 0/16px 16px; }
.thumb.none { height:96px; }
.thumb img { max-width:256px; max-height:256px; }
.noimage { color:var(--muted); font-size:13px; padding:12px; text-align:center; }
.body { padding:10px 12px 12px; display:flex; flex-direction:column; gap:6px; }
.head { display:flex; justify-content:space-between; gap:8px; align-items:baseline; }
.id { font-family:ui-monospace, monospace; font-size:12px; word-break:break-all; }
.badge { border-radius:10px; padding:1px 8px; font-size:12px; color:#fff; background:var(--off); }
.st-succeeded .badge { background:var(--ok); }
.st-failed .badge, .st-rejected .badge { background:var(--bad); }
.st-invalid .badge { background:var(--warn); }
.st-failed, .st-rejected { border-color:var(--bad); }
.st-invalid { border-color:var(--warn); }
.facts { color:var(--muted); font-size:12px; }
.prompt, .revised, .error { margin:0; white-space:pre-wrap; overflow-wrap:anywhere; }
.label { color:var(--muted); font-size:12px; display:block; }
.error { color:var(--bad); }
dl.extra { margin:0; display:grid; grid-template-columns:auto 1fr; gap:2px 8px; font-size:12px; }
dl.extra dt { color:var(--muted); }
dl.extra dd { margin:0; overflow-wrap:anywhere; }
.empty { grid-column:1/-1; color:var(--muted); text-align:center; padding:40px; }
"""

# Plain ES2017; no eval, no innerHTML, no network.
JS = r"""
"use strict";
(function () {
  const PAGE = 60;
  const raw = JSON.parse(document.getElementById("gallery-data").textContent);
  const cols = raw.columns;
  const rows = raw.rows.map(function (values) {
    const row = {};
    cols.forEach(function (name, i) { row[name] = values[i]; });
    return row;
  });
  const searchable = ["job_id", "prompt", "revised_prompt", "error_code", "error_message",
    "model", "size", "quality", "status"].concat(raw.extra);
  rows.forEach(function (row) {
    row._hay = searchable.map(function (c) { return row[c] == null ? "" : String(row[c]); })
      .join("\n").toLowerCase();
  });

  const $ = function (id) { return document.getElementById(id); };
  const state = { status: "", model: "", q: "", page: 0 };
  let shown = rows;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text != null && text !== "") node.textContent = String(text);
    return node;
  }

  function href(path) {
    return path.split("/").map(encodeURIComponent).join("/");
  }

  function fillSelect(select, key, label) {
    const counts = new Map();
    rows.forEach(function (row) {
      const v = row[key] == null ? "" : String(row[key]);
      counts.set(v, (counts.get(v) || 0) + 1);
    });
    select.appendChild(el("option", null, "all " + label + " (" + rows.length + ")")).value = "";
    Array.from(counts.keys()).sort().forEach(function (v) {
      const option = el("option", null, (v || "(none)") + " (" + counts.get(v) + ")");
      option.value = v;
      select.appendChild(option);
    });
  }

  function thumb(row) {
    const box = el("div", "thumb");
    if (row.thumb && row.file) {
      const link = el("a");
      link.href = href(row.file);
      link.target = "_blank";
      link.rel = "noopener";
      link.title = "open the full image";
      const img = el("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = row.prompt == null ? "" : String(row.prompt).slice(0, 200);
      img.src = href(row.thumb);
      link.appendChild(img);
      box.appendChild(link);
    } else if (row.file) {
      const link = el("a", "noimage", "open the image");
      link.href = href(row.file);
      link.target = "_blank";
      link.rel = "noopener";
      box.appendChild(link);
    } else {
      box.className = "thumb none";
      box.appendChild(el("div", "noimage", row.status === "succeeded" ? "no file" : "no image: " + row.status));
    }
    return box;
  }

  function text(parent, cls, label, value) {
    if (value == null || value === "") return;
    const p = el("p", cls);
    p.appendChild(el("span", "label", label));
    p.appendChild(document.createTextNode(String(value)));
    parent.appendChild(p);
  }

  function card(row) {
    const node = el("article", "card st-" + String(row.status).replace(/[^a-z_]/g, ""));
    node.appendChild(thumb(row));
    const body = el("div", "body");
    const head = el("div", "head");
    head.appendChild(el("span", "id", (row.job_id == null ? "row " + row.row : row.job_id) + " #" + row.image_index));
    head.appendChild(el("span", "badge", row.status));
    body.appendChild(head);
    const facts = [row.model, row.size, row.quality, row.operation, row.row == null ? null : "row " + row.row,
      row.width && row.width + "x" + row.height !== row.size ? row.width + "x" + row.height : null].filter(function (v) { return v != null && v !== ""; });
    body.appendChild(el("div", "facts", facts.join(" · ")));
    text(body, "prompt", "prompt", row.prompt);
    text(body, "revised", "revised prompt", row.revised_prompt);
    if (row.error_code || row.error_message) {
      text(body, "error", "error" + (row.error_code ? " (" + row.error_code + ")" : ""), row.error_message || row.error_code);
    } else if (row.status === "not_run") {
      text(body, "error", "not run", "the run stopped before this image was requested");
    }
    const extras = raw.extra.filter(function (c) { return row[c] != null && row[c] !== ""; });
    if (extras.length) {
      const dl = el("dl", "extra");
      extras.forEach(function (c) {
        dl.appendChild(el("dt", null, c));
        dl.appendChild(el("dd", null, row[c]));
      });
      body.appendChild(dl);
    }
    node.appendChild(body);
    return node;
  }

  function apply() {
    const q = state.q.trim().toLowerCase();
    shown = rows.filter(function (row) {
      return (!state.status || row.status === state.status) &&
        (!state.model || (row.model == null ? "" : String(row.model)) === state.model) &&
        (!q || row._hay.indexOf(q) !== -1);
    });
    const pages = Math.max(1, Math.ceil(shown.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * PAGE;
    const grid = $("cards");
    const fragment = document.createDocumentFragment();
    shown.slice(start, start + PAGE).forEach(function (row) { fragment.appendChild(card(row)); });
    if (!shown.length) fragment.appendChild(el("div", "empty", "No image matches."));
    grid.replaceChildren(fragment);
    $("count").textContent = shown.length ? (start + 1) + "–" + Math.min(start + PAGE, shown.length) + " of " + shown.length : "0 of 0";
    $("page").textContent = "page " + (state.page + 1) + " / " + pages;
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages - 1;
  }

  $("title").textContent = raw.title;
  $("summary").textContent = raw.summary + " · ";
  const manifestLink = el("a", null, "manifest.csv");
  manifestLink.href = "manifest.csv";
  $("summary").appendChild(manifestLink);
  fillSelect($("status"), "status", "statuses");
  fillSelect($("model"), "model", "models");
  $("status").addEventListener("change", function (e) { state.status = e.target.value; state.page = 0; apply(); });
  $("model").addEventListener("change", function (e) { state.model = e.target.value; state.page = 0; apply(); });
  $("q").addEventListener("input", function (e) { state.q = e.target.value; state.page = 0; apply(); });
  $("prev").addEventListener("click", function () { state.page -= 1; apply(); window.scrollTo(0, 0); });
  $("next").addEventListener("click", function () { state.page += 1; apply(); window.scrollTo(0, 0); });
  apply();
  document.body.dataset.ready = "1";
})();
"""
