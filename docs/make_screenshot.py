"""Regenerate docs/gallery.png: the example catalog's gallery, run against the simulator.

    .venv/bin/python docs/make_screenshot.py

Uses the tests' headless-Chromium driver (tests/browser.py). CJK prompts need a CJK font
for Chromium (Debian: fonts-wqy-microhei); without one they show as boxes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser import GALLERY_READY, Browser  # noqa: E402

from imagebatch.simulator import SimConfig, SimulatorServer  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, SimulatorServer(SimConfig(latency=0.01)) as sim:
        out = Path(tmp) / "out"
        env = {**os.environ, "OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-docs"}
        cli = Path(sys.executable).with_name("imagebatch")
        subprocess.run(
            [str(cli), "run", str(ROOT / "data" / "catalog.csv"), "--out", str(out), "--quiet"],
            env=env,
            check=False,  # the catalog has one invalid row on purpose: exit status 1
            timeout=600,
        )
        with Browser(width=1280, height=1100) as browser:
            browser.open((out / "index.html").as_uri(), GALLERY_READY)
            browser.wait_for(
                "Array.from(document.images).filter(i => i.getBoundingClientRect().top < innerHeight)"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
            target = ROOT / "docs" / "gallery.png"
            browser.screenshot(target)
            print(f"wrote {target}")


if __name__ == "__main__":
    main()
