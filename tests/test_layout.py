"""The package's layout: its modules, and its packages with all they hold, import one another
without a cycle, so each stage can be read, tested and replaced on its own (a cycle hidden in a
function-level import counts too)."""

from __future__ import annotations

from itertools import combinations

import grimp

PACKAGE = "flywheel_pipeline"


def import_cycles(graph: grimp.ImportGraph) -> list[str]:
    """Each direct import whose imported module leads back to its importer: the cycle, as the
    chain of imports."""
    return [" -> ".join([importer, *graph.find_shortest_chain(importer=imported, imported=importer)])
            for importer in sorted(graph.modules)
            for imported in sorted(graph.find_modules_directly_imported_by(importer))
            if imported != importer and graph.chain_exists(importer=imported, imported=importer)]


def sibling_cycles(graph: grimp.ImportGraph) -> list[str]:
    """Each pair of modules or packages under one parent that import each other (a package with
    everything in it), directly or through others: import-linter's acyclic siblings."""
    def reaches(a: str, b: str) -> bool:
        return graph.chain_exists(importer=a, imported=b, as_packages=True)

    return [f"{a} <-> {b}"
            for parent in sorted(m for m in graph.modules if graph.find_children(m))
            for a, b in combinations(sorted(graph.find_children(parent)), 2)
            if reaches(a, b) and reaches(b, a)]


def test_no_module_imports_one_that_imports_it_back():
    assert import_cycles(grimp.build_graph(PACKAGE, cache_dir=None)) == []


def test_no_package_imports_one_that_imports_it_back():
    assert sibling_cycles(grimp.build_graph(PACKAGE, cache_dir=None)) == []
