"""The package's layout: its modules import one another without a cycle, so each stage's module
can be read, tested and replaced on its own (a cycle hidden in a function-level import counts too)."""

from __future__ import annotations

import grimp


def import_cycles(package: str) -> list[str]:
    """Each direct import in ``package`` whose imported module leads back to its importer: the
    cycle, as the chain of imports."""
    graph = grimp.build_graph(package, cache_dir=None)
    return [" -> ".join([importer, *graph.find_shortest_chain(importer=imported, imported=importer)])
            for importer in sorted(graph.modules)
            for imported in sorted(graph.find_modules_directly_imported_by(importer))
            if imported != importer and graph.chain_exists(importer=imported, imported=importer)]


def test_no_module_imports_one_that_imports_it_back():
    assert import_cycles("flywheel_pipeline") == []
