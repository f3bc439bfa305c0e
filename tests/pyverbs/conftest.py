"""Fixtures for the pyverbs layer: softrdma's opt-in ``pyverbs`` package
imported from the directory ``softrdma pyverbs-path`` prints, and the
simulated machine of the process rebuilt for each test with the devices
the test asks for."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from softrdma.cli.pyverbs import pyverbs_path

#: The device kinds a pyverbs process can be configured with.
KINDS = ("cpu", "iommu", "swiotlb", "direct")


def pyverbs_env() -> dict[str, str]:
    """The environment of a subprocess that imports our pyverbs."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(pyverbs_path()), src]))


@pytest.fixture(scope="session")
def pyverbs_on_path() -> Iterator[None]:
    """Put the pyverbs directory first on ``sys.path`` for the session, and
    take it (and every imported ``pyverbs`` module) away afterwards."""
    path = str(pyverbs_path())
    sys.path.insert(0, path)
    try:
        import pyverbs

        assert Path(pyverbs.__file__).parent.parent == pyverbs_path()
        yield
    finally:
        sys.path.remove(path)
        for name in [m for m in sys.modules if m == "pyverbs" or m.startswith("pyverbs.")]:
            del sys.modules[name]


@pytest.fixture
def machine(
    pyverbs_on_path: None, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh simulated machine; its devices are ``request.param`` (a
    ``SOFTRDMA_PYVERBS_DEVICES`` value), ``rxe0:cpu`` by default. Yields
    the first device's name."""
    from pyverbs import _softrdma as sim

    spec = getattr(request, "param", "rxe0:cpu")
    monkeypatch.setenv(sim.ENV_DEVICES, spec)
    monkeypatch.setattr(sim, "_PROCESS", None)
    yield sim.parse_devices(spec)[0].name
