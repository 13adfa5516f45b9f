"""No public name of the package hides one of its modules.

``capsock.forward`` once meant both the ``forward()`` function (exported by
``capsock/__init__.py``) and the forwarding module: whichever was bound last
won, so ``capsock.forward.register`` broke depending on import order.
"""

from __future__ import annotations

import importlib
import pkgutil
import types

import capsock


def test_no_exported_name_shadows_a_submodule() -> None:
    clashes = []
    for info in pkgutil.iter_modules(capsock.__path__):
        if info.name == "__main__":
            continue  # running it is the CLI
        module = importlib.import_module(f"capsock.{info.name}")
        bound = getattr(capsock, info.name, module)
        if bound is not module:
            kind = "module" if isinstance(bound, types.ModuleType) else type(bound).__name__
            clashes.append(f"capsock.{info.name} is a {kind}, not the module {module.__name__}")
    assert clashes == []
