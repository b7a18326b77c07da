"""Imports point down the layers: a lower layer never reaches up into a higher one.

Every import of every module of dr_pipeline and teachers is read from its source (ast, so
imports inside functions and under TYPE_CHECKING count too) and its layer compared with the
importer's. Within one package imports are free. Teachers may use only the part of the core
that teachers/__init__.py documents.
"""

import ast
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
LAYERS = ("core", "sources", "views", "dataset", "read", "teachers", "generate", "execution", "tools", "cli")
"""Bottom to top. Reading a dataset sits just above it: `--extend` (execution) and the tools read datasets."""

TEACHERS_MAY_USE = {
    "dr_pipeline.core.accelerator",
    "dr_pipeline.core.config",
    "dr_pipeline.core.errors",
    "dr_pipeline.core.records",
    "dr_pipeline.core.seeding",
    "dr_pipeline.core.storage",
}
"""The core modules teachers depend on (the surface documented in teachers/__init__.py)."""

def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPOSITORY).with_suffix("").parts).removesuffix(".__init__")


def _layer(module: str) -> str | None:
    """The layer of a dr_pipeline or teachers module; None for any other (libraries, schemas) and
    for the package itself (its __init__ only names the version and the lazy public entry points)."""
    parts = module.split(".")
    if parts[0] == "teachers":
        return "teachers"
    if parts[0] != "dr_pipeline" or len(parts) == 1:
        return None
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: dr_pipeline/{parts[1]} is in no layer; add it to LAYERS")
    return parts[1]


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every absolute import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; write the absolute module"
            found.append((node.module, node.lineno))
    return found


SOURCES = sorted([*REPOSITORY.glob("dr_pipeline/**/*.py"), *REPOSITORY.glob("teachers/**/*.py")])
EDGES = [(_module_name(path), imported, line) for path in SOURCES for imported, line in _imports(path)]


def test_every_source_is_found():
    assert len(SOURCES) > 40 and any(name == "dr_pipeline.cli" for name, _, _ in EDGES)


def test_imports_point_down():
    upward = []
    for importer, imported, line in EDGES:
        low, high = _layer(importer), _layer(imported)
        if low and high and LAYERS.index(high) > LAYERS.index(low):
            upward.append(f"{importer} (line {line}) imports {imported}: {low} is below {high}")
    assert not upward, "\n".join(upward)


def test_from_the_package_itself_only_its_version_is_imported():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "dr_pipeline":
                assert [a.name for a in node.names] == ["__version__"], f"{path}:{node.lineno}"


def test_teachers_use_only_their_part_of_the_core():
    outside = [
        f"{importer} (line {line}) imports {imported}"
        for importer, imported, line in EDGES
        if importer.startswith("teachers") and imported.startswith("dr_pipeline") and imported not in TEACHERS_MAY_USE
    ]
    assert not outside, "\n".join(outside)


@pytest.mark.parametrize("module", sorted(TEACHERS_MAY_USE))
def test_the_core_teachers_use_imports_no_higher_layer(module):
    """What teachers rely on stays at the bottom: those modules import only the core."""
    imported = {high for importer, high, _ in EDGES if importer == module and _layer(high)}
    assert all(_layer(name) == "core" for name in imported), sorted(imported)
