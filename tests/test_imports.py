"""Every module of both packages imports, and the operator never pulls in torch.

A module that cannot even be imported (undefined names, missing deps) must never land.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import kubedpo_operator
import kubedpo_trainer


def _modules(pkg) -> list[str]:
    # __main__ modules run their program on import; they are covered by the CLI tests.
    names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return [pkg.__name__] + [n for n in names if not n.endswith(".__main__")]


ALL = _modules(kubedpo_trainer) + _modules(kubedpo_operator)


@pytest.mark.parametrize("name", ALL)
def test_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_both_packages_have_modules() -> None:
    assert len(_modules(kubedpo_trainer)) > 5


def test_operator_does_not_import_torch() -> None:
    code = (
        "import sys, importlib, pkgutil, kubedpo_operator as p\n"
        "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "bad = [m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _layered(container: str, layers: list[str]) -> set[str]:
    return {f"{container}.{m.strip()}" for layer in layers for m in layer.replace(":", "|").split("|")}


def test_every_module_sits_in_an_import_layer() -> None:
    """A new module must be placed in [tool.importlinter]'s layers (pyproject.toml): one left out is
    free to import anything, and the layering contract would silently stop covering it."""
    import tomllib
    from pathlib import Path

    cfg = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["importlinter"]
    layered: set[str] = set()
    for contract in cfg["contracts"]:
        if contract["type"] == "layers":
            for container in contract["containers"]:
                layered |= _layered(container, contract["layers"])
    containers = {c for contract in cfg["contracts"] if contract["type"] == "layers" for c in contract["containers"]}
    direct = [n for n in ALL if "." in n and n.rsplit(".", 1)[0] in containers]
    missing = sorted(n for n in direct if n not in layered)
    assert not missing, f"add these modules to a layer in pyproject.toml [tool.importlinter]: {missing}"
