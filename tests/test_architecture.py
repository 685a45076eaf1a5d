"""docs/architecture.md against the code: every module it should describe is there, each module says what it owns,
and imports point the way the page says (read from the source with ``ast``, function-local imports included)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "llavatune"
DOC = ROOT / "docs" / "architecture.md"

BASE = {"utils", "files", "config", "quiet", "_compat", "zero"}
# package -> llavatune packages it may not import (the page's "Which way imports point")
FORBIDDEN = {
    "data": {"train", "eval", "infer", "plan", "report", "demo", "cli"},
    "model": {"train", "eval", "infer", "plan", "report", "demo", "cli"},
    "infer": {"train", "eval", "plan", "report", "demo", "cli"},
    "eval": {"train", "plan", "report", "demo", "cli"},
    "report": {"train", "eval", "infer", "plan", "data", "demo", "cli"},
    "plan": {"eval", "infer", "report", "demo", "cli"},
    "train": {"plan", "demo", "cli"},
}


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _main_block(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imports(path: Path) -> set[str]:
    """llavatune modules ``path`` imports anywhere (module level or inside functions), except under
    ``if __name__ == "__main__":`` (a ``python -m`` entry point that hands over to the CLI)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _main_block(node):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llavatune"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("llavatune"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_point_one_way():
    mods = modules()
    known = {top(m) for m in mods}
    bad = []
    for mod, path in mods.items():
        pkg = top(mod)
        for dep in imports(path):
            dep_pkg = top(dep)
            if dep_pkg in (pkg, "") or dep_pkg not in known:  # the package itself, or a name (llavatune.__version__)
                continue
            if dep_pkg in FORBIDDEN.get(pkg, ()):
                bad.append(f"{mod} imports {dep}")
            if pkg in BASE and dep_pkg not in BASE and not dep.startswith("llavatune.data.reader"):
                bad.append(f"{mod} (base) imports {dep}")
            if pkg == "plan" and dep_pkg == "train" and not dep.startswith("llavatune.train.train_config") \
                    and dep != "llavatune.train":
                bad.append(f"{mod} imports {dep} (plan reads train's options only)")
    assert bad == []


def test_rules_catch_a_wrong_way_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from llavatune.train.run import train\n"
                 "if __name__ == '__main__':\n    from llavatune.cli import main\n")
    assert imports(f) == {"llavatune.train.run", "llavatune.train.run.train"}


def test_every_module_says_what_it_owns():
    missing = [m for m, p in modules().items() if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert missing == []


def test_architecture_page_names_every_module_and_is_linked():
    text = DOC.read_text()
    named = set(re.findall(r"`([a-z_][a-z_0-9./]*(?:\.py|/))`", text))
    missing = []
    for path in modules().values():
        rel = path.relative_to(SRC).as_posix()
        if rel == "__init__.py":
            continue
        if rel.endswith("/__init__.py"):
            rel = rel[: -len("__init__.py")]
        if rel not in named:
            missing.append(rel)
    assert missing == [], f"docs/architecture.md does not describe {missing}"
    stale = [n for n in named if "/" in n or n.endswith(".py")
             if not (SRC / n).exists() and not (ROOT / n).exists()]
    assert stale == [], f"docs/architecture.md names files that do not exist: {stale}"
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()
