"""The README's architecture section stays true: what it names exists, and every stage and
flow module is named there."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def architecture() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"^## Architecture\n(.*?)^## ", text, re.S | re.M)
    assert found, "README.md has no '## Architecture' section followed by another section"
    return found.group(1)


def named_paths(section: str) -> list[Path]:
    """Backticked `module.py` and `data.toml` names. A bare `module.py` is in the paragraph's
    last `folder/` named, else in the folder of its first path."""
    paths = []
    for paragraph in section.split("\n\n"):
        tokens = re.findall(r"`([\w./-]+)`", paragraph)
        firsts = [t for t in tokens if "/" in t]
        folder = ROOT
        if firsts:
            folder = ROOT / firsts[0] if firsts[0].endswith("/") else (ROOT / firsts[0]).parent
        for token in tokens:
            if token.endswith("/"):
                folder = ROOT / token  # context for bare names; output folders are named too
            elif token.endswith((".py", ".toml")):
                paths.append(ROOT / token if "/" in token else folder / token)
    return paths


def test_every_module_the_architecture_names_exists():
    paths = named_paths(architecture())
    assert len(paths) > 20
    missing = [str(p.relative_to(ROOT)) for p in paths if not p.exists()]
    assert missing == []


def test_every_stage_and_flow_module_is_named():
    named = set(named_paths(architecture()))
    modules = [
        p
        for folder in ("tasks", "flows")
        for p in sorted((ROOT / folder).glob("*.py"))
        if p.name != "__init__.py"
    ]
    assert modules
    unnamed = [str(p.relative_to(ROOT)) for p in modules if p not in named]
    assert unnamed == []


def test_the_parser_follows_folders():
    section = (
        "`imagebatch/simulator/` has `app.py`; `tasks/store.py` and `nowhere.py`\n\n"
        "`tasks/batch.py` and `flows/x.py`, then `batch_api.py`"
    )
    assert named_paths(section) == [
        ROOT / "imagebatch/simulator/app.py",
        ROOT / "tasks/store.py",
        ROOT / "imagebatch/simulator/nowhere.py",
        ROOT / "tasks/batch.py",
        ROOT / "flows/x.py",
        ROOT / "tasks/batch_api.py",
    ]


def package_of(path: Path) -> list[str]:
    """The installed package a file is in: tasks/, flows/ and configs/ install under imagebatch."""
    parts = list(path.relative_to(ROOT).parent.parts)
    return parts if parts[:1] == ["imagebatch"] else ["imagebatch", *parts]


def imports(path: Path, source: str | None = None) -> list[tuple[str, bool]]:
    """(module imported, whether at module level) for every import in a file; relative
    imports (`from ..tasks import x`, `from . import y`) as the absolute names they mean."""
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            package = package_of(path)
            base = ".".join(package[: len(package) - node.level + 1])
            if node.module:
                found.append((f"{base}.{node.module}", id(node) in top))
            else:
                found.extend((f"{base}.{alias.name}", id(node) in top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, id(node) in top) for alias in node.names)
    return found


LAYERS = {
    # folder: packages its modules must never import
    "configs": ("imagebatch.tasks", "imagebatch.flows", "imagebatch.simulator", "imagebatch.cli"),
    "tasks": ("imagebatch.flows", "imagebatch.simulator", "imagebatch.cli", "imagebatch.api"),
    "imagebatch/simulator": ("imagebatch.tasks", "imagebatch.flows", "imagebatch.cli"),
}


def test_imports_run_one_way():
    wrong = [
        f"{path.relative_to(ROOT)} imports {module}"
        for folder, banned in LAYERS.items()
        for path in sorted((ROOT / folder).glob("*.py"))
        for module, _ in imports(path)
        if module.startswith(banned)
    ]
    assert wrong == []


def test_the_pipeline_imports_the_simulator_only_where_it_starts_it():
    pipeline = [
        *(ROOT / "flows").glob("*.py"),
        ROOT / "imagebatch/cli.py",
        ROOT / "imagebatch/api.py",
    ]
    at_module_level = [
        str(path.relative_to(ROOT))
        for path in pipeline
        for module, top in imports(path)
        if module.startswith("imagebatch.simulator") and top
    ]
    assert at_module_level == []


def test_relative_imports_are_seen_as_what_they_import():
    sim = ROOT / "imagebatch/simulator/x.py"
    source = "from .config import SimConfig\nfrom ..tasks import store\nfrom . import rules\n"
    assert [m for m, _ in imports(sim, source)] == [
        "imagebatch.simulator.config",
        "imagebatch.tasks",
        "imagebatch.simulator.rules",
    ]
    assert [m for m, _ in imports(ROOT / "tasks/x.py", "from ..flows import run_jobs")] == [
        "imagebatch.flows"
    ]
