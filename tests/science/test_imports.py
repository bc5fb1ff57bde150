"""The package's layers point one way: ``science/`` is pure and imports nothing above it."""

import ast
from pathlib import Path

import gaia_flows.science

SCIENCE = Path(gaia_flows.science.__file__).parent


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
    return names


def test_science_imports_only_science_and_third_party_code():
    files = sorted(SCIENCE.rglob("*.py"))
    assert len(files) > 5
    outside = {
        f"{path.name}: {name}"
        for path in files
        for name in _imported_modules(path)
        if name.startswith(".")
        or (name.split(".")[0] == "gaia_flows" and not name.startswith("gaia_flows.science"))
    }
    assert not outside, (
        f"science/ must not import the rest of gaia_flows (or use relative imports): {sorted(outside)}"
    )
