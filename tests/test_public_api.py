"""The public API: what ``softrdma`` and each layer package export exists,
is the object its module defines, and says what it is."""

from __future__ import annotations

import importlib
import inspect

import pytest

import softrdma

PACKAGES = [
    "softrdma.memory",
    "softrdma.time",
    "softrdma.dma",
    "softrdma.verbs",
    "softrdma.transport",
    "softrdma.fabric",
    "softrdma.drivers",
    "softrdma.mad",
    "softrdma.cm",
    "softrdma.ulp.cm_target",
    "softrdma.ulp.cq_work",
    "softrdma.ulp.progress",
    "softrdma.ulp.databuf",
    "softrdma.ulp.iu",
    "softrdma.ulp.scsi",
    "softrdma.ulp.srp",
    "softrdma.ulp.iscsi",
    "softrdma.ulp.iser",
    "softrdma.perf",
]


@pytest.mark.parametrize("name", ["softrdma", *PACKAGES])
def test_every_exported_name_exists_once(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), "a name is listed twice"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name} lists names it does not have: {missing}"


def test_the_facade_reexports_the_layers_objects() -> None:
    """``softrdma.X`` is the layer's own object, not a copy or a wrapper."""
    for name in softrdma.__all__:
        obj = getattr(softrdma, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants and enum members: their value is the object
        home = importlib.import_module(obj.__module__)
        assert getattr(home, obj.__name__) is obj, name


@pytest.mark.parametrize("name", ["softrdma", *PACKAGES])
def test_exported_classes_and_functions_are_documented(name: str) -> None:
    module = importlib.import_module(name)
    undocumented = [
        n
        for n in module.__all__
        if (inspect.isclass(obj := getattr(module, n)) or inspect.isfunction(obj))
        and not inspect.getdoc(obj)
    ]
    assert not undocumented, f"{name}: no docstring on {undocumented}"


def test_the_readme_programs_need_only_the_public_packages() -> None:
    """The README's examples import from ``softrdma`` and, for the upper-layer
    protocols, from their packages' exported names — never from a module."""
    from tests.test_readme import PROGRAMS

    allowed = tuple(f"from {name} import" for name in ["softrdma", *PACKAGES])
    for program in PROGRAMS:
        imports = [line for line in program.splitlines() if line.startswith(("from ", "import "))]
        assert all(line.startswith(allowed) for line in imports), imports
        assert any(line.startswith("from softrdma import") for line in imports), imports
