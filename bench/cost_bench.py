"""Estimate versus actual cost: the example catalog and a mixed 1,000-job run, plus a capped run.

    python bench/cost_bench.py [--jobs 1000] [--no-record] [--workdir DIR]

Each run is the real CLI (`imagebatch run ... -q`) against a fresh simulator process on
loopback (`python -m imagebatch.simulator --port 0 --latency 0 --no-text`), which returns
`usage` as the published token figures say. The numbers come from each run's run.json
(`cost`) and manifest. Nothing here asserts; the table is appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MODELS = [
    # (model, sizes, qualities, n max, weight)
    (
        "gpt-image-2",
        ["1024x1024", "1536x1024", "1024x1536", "1280x720", "2048x2048", "3840x2160", "auto"],
        ["low", "medium", "high", "auto"],
        4,
        5,
    ),
    (
        "gpt-image-2.5-flare",
        ["1024x1024", "1536x1024", "2880x1616"],
        ["low", "medium", "high"],
        3,
        2,
    ),
    ("gpt-image-1", ["1024x1024", "1536x1024", "1024x1536"], ["low", "medium", "high"], 3, 1),
    ("dall-e-3", ["1024x1024", "1792x1024", "1024x1792"], ["standard", "hd"], 1, 1),
    ("dall-e-2", ["256x256", "512x512", "1024x1024"], [""], 4, 1),
]
WORDS = [
    "a",
    "quiet",
    "harbour",
    "at",
    "dawn",
    "with",
    "fishing",
    "boats,",
    "gulls,",
    "mist,",
    "warm",
    "light,",
    "oil",
    "paint",
]
CJK = "一只在雪地里奔跑的柴犬和白色暹罗猫的照片"


def make_jobs(path: Path, count: int, seed: int = 11) -> None:
    """A deterministic mix of models, sizes, qualities, n, prompt lengths and a few edits."""
    rng = random.Random(seed)
    src = path.parent / "src.png"
    Image.new("RGB", (1024, 768), "white").save(src)
    weighted = [m for m in MODELS for _ in range(m[4])]
    rows = []
    for i in range(count):
        model, sizes, qualities, n_max, _ = rng.choice(weighted)
        words = rng.randint(3, 120)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        if rng.random() < 0.15:
            prompt = CJK[: rng.randint(4, len(CJK))] + " " + prompt
        row = {
            "id": f"job{i:05d}",
            "prompt": f"{prompt} #{i}",
            "model": model,
            "size": rng.choice(sizes),
            "quality": rng.choice(qualities),
            "n": rng.randint(1, n_max),
        }
        if model == "gpt-image-2" and rng.random() < 0.1:
            row.update(operation="edit", image=src.name, size="1024x1024")
        rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)


def start_simulator(log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "imagebatch.simulator",
        "--port",
        "0",
        "--latency",
        "0",
        "--no-text",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    assert proc.stdout is not None
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        found = re.search(r"listening on (\S+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise SystemExit("the simulator did not start")


def run_cli(jobs: Path, out: Path, base_url: str, *extra: str) -> tuple[int, str]:
    env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "sk-bench"}
    # The ephemeral Prefect API can take long to start on a busy machine.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    args = ["run", str(jobs), "--out", str(out), "-q", "--task-per", "chunk", *extra]
    cmd = [sys.executable, "-m", "imagebatch.cli", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    if not (out / "run.json").exists():
        raise SystemExit(f"{' '.join(args)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.returncode, "imagebatch " + " ".join(args)


def measure(jobs: Path, out: Path, log: Path, *extra: str) -> dict:
    sim, base_url = start_simulator(log)
    try:
        code, command = run_cli(jobs, out, base_url, *extra)
    finally:
        sim.terminate()
        sim.wait(timeout=30)
    cost = json.loads((out / "run.json").read_text())["cost"]
    manifest = pd.read_csv(out / "manifest.csv")
    made = manifest[manifest.status == "succeeded"]
    priced = made[made.cost_usd.notna() & made.estimated_usd.notna()]
    rel = ((priced.estimated_usd - priced.cost_usd) / priced.cost_usd).abs()
    return {
        "command": command,
        "exit": code,
        "images": len(manifest),
        "made": len(made),
        "plan": cost["plan"]["estimate_usd"],
        "worst": cost["plan"]["worst_case_usd"],
        "unknown": cost["plan"]["unknown_images"],
        "est_made": cost["estimated_usd_of_made"],
        "actual_made": cost["actual_usd_of_made"],
        "compared": cost["images_compared"],
        "actual": cost["actual_usd"],
        "unpriced": cost["unpriced_images"],
        "unestimated": cost["unestimated_images"],
        "per_image_max_err": float(rel.max()) if len(rel) else 0.0,
        "per_image_exact": int((rel < 1e-9).sum()),
        "priced_images": len(priced),
        "committed": cost["committed_usd"],
        "cap": cost["max_cost"],
        "stopped": cost["stopped_by_cap"],
        "not_run_cap": int((manifest.error_code == "cost_cap").sum()),
    }


def table(results: dict[str, dict]) -> str:
    rows = [
        ("command", "command"),
        ("exit status", "exit"),
        ("images requested / made", None),
        ("plan estimate (all images)", "plan"),
        ("plan worst case", "worst"),
        ("actual spend (priced from usage)", "actual"),
        ("images with an estimate and a price", "compared"),
        ("their estimate", "est_made"),
        ("their actual cost", "actual_made"),
        ("actual / estimate", None),
        ("per-image estimate exact / priced", None),
        ("per-image max relative error", "per_image_max_err"),
        ("images made with no estimate (unknown)", "unestimated"),
        ("images made with no price (unknown)", "unpriced"),
        ("cap / committed spend", None),
        ("images not_run by the cap", "not_run_cap"),
    ]
    names = list(results)
    out = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, key in rows:
        cells = []
        for r in results.values():
            if label.startswith("images requested"):
                cells.append(f"{r['images']} / {r['made']}")
            elif label.startswith("actual / estimate"):
                cells.append(f"{r['actual_made'] / r['est_made']:.4f}" if r["est_made"] else "-")
            elif label.startswith("per-image estimate exact"):
                cells.append(f"{r['per_image_exact']} / {r['priced_images']}")
            elif label.startswith("cap /"):
                cells.append(f"${r['cap']:.2f} / ${r['committed']:.4f}" if r["cap"] else "-")
            elif key == "command":
                cells.append(f"`{r[key]}`")
            elif isinstance(r[key], float):
                cells.append(f"{r[key]:.4f}" if "err" in key else f"${r[key]:.4f}")
            else:
                cells.append(str(r[key]))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path("/tmp/imagebatch-bench") / time.strftime("cost-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    jobs = work / "jobs.csv"
    make_jobs(jobs, args.jobs)
    results = {
        "example catalog": measure(
            ROOT / "data" / "catalog.csv", work / "catalog", work / "sim1.log"
        )
    }
    results[f"{args.jobs} mixed jobs"] = measure(jobs, work / "mixed", work / "sim2.log")
    cap = round(results[f"{args.jobs} mixed jobs"]["plan"] / 2, 2)
    results[f"{args.jobs} jobs, --max-cost {cap}"] = measure(
        jobs, work / "capped", work / "sim3.log", "--max-cost", str(cap)
    )
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    report = (
        "## Cost: estimate versus actual\n\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit: `{commit}`; "
        f"command: `python bench/cost_bench.py --jobs {args.jobs}`\n"
        f"- setup: simulator `python -m imagebatch.simulator --port 0 --latency 0 --no-text` "
        "(fresh per run; usage by the published token figures); the real CLI with "
        f"`--task-per chunk`; jobs: {args.jobs} rows mixing gpt-image-2 (sizes incl. free and "
        "auto, qualities incl. auto, 10% edits), gpt-image-2.5-flare, gpt-image-1, dall-e-3, "
        f"dall-e-2, n 1-4, prompts 3-120 words, 15% with CJK; raw: `{work}`\n\n"
        f"{table(results)}\n"
    )
    print(report)
    if not args.no_record:
        with (ROOT / "bench" / "RESULTS.md").open("a", encoding="utf-8") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
