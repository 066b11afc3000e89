"""Every module's ``__all__`` names things that exist, and every package module declares one."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = ["agent", "registry", "hub", "fleet"]
SKIP_PREFIXES: tuple[str, ...] = ()


def _modules() -> list[str]:
    names = []
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        names.append(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}."):
            if not info.name.endswith("__main__") and not info.name.startswith(SKIP_PREFIXES):
                names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_all_is_declared_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    if name.endswith(".cli"):
        return
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr}"
