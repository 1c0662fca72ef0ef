"""The shape of `converge.serving.v2`: its modules form no import cycle and each imports alone.

`restricted.py` is also copied into MLServer's environment, where converge is not installed,
so it may import nothing from converge but the allow-list it falls back to in our environment.
"""

from __future__ import annotations

import graphlib
import subprocess
import sys

import grimp
import pytest

PACKAGE = "converge.serving.v2"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("converge", cache_dir=None)


def _modules(graph: grimp.ImportGraph) -> list[str]:
    return sorted(module for module in graph.modules if module.startswith(f"{PACKAGE}."))


def test_the_modules_import_each_other_without_a_cycle(graph: grimp.ImportGraph) -> None:
    modules = _modules(graph)
    assert len(modules) >= 8
    edges = {module: graph.find_modules_directly_imported_by(module) & set(modules) for module in modules}
    graphlib.TopologicalSorter(edges).prepare()  # raises CycleError, naming the cycle


def test_no_module_imports_the_package_facade(graph: grimp.ImportGraph) -> None:
    importers = graph.find_modules_that_directly_import(PACKAGE)
    assert not {module for module in importers if module.startswith(f"{PACKAGE}.")}


def test_restricted_imports_nothing_from_converge_but_the_allow_list(graph: grimp.ImportGraph) -> None:
    imported = graph.find_modules_directly_imported_by(f"{PACKAGE}.restricted")
    from_converge = {module for module in imported if module.startswith("converge")}
    assert from_converge == {"converge.core.pickle_allowlist"}


def test_every_module_imports_alone_in_a_fresh_interpreter(graph: grimp.ImportGraph) -> None:
    for module in [PACKAGE, *_modules(graph)]:
        proc = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, f"import {module}: {proc.stderr}"
