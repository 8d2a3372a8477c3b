"""Every module's public surface is exactly what its ``__all__`` says."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import tracker


def test_every_public_class_and_function_is_exported_and_nothing_else() -> None:
    for module_info in pkgutil.walk_packages(tracker.__path__, "tracker."):
        if module_info.name.rpartition(".")[2].startswith("_"):
            continue
        module = importlib.import_module(module_info.name)
        exported = set(module.__all__)
        defined = {
            name
            for name, obj in vars(module).items()
            if not name.startswith("_")
            and (inspect.isclass(obj) or inspect.isfunction(obj))
            and obj.__module__ == module.__name__
        }
        assert defined <= exported, f"{module.__name__} does not export {defined - exported}"
        missing = {name for name in exported if not hasattr(module, name)}
        assert not missing, f"{module.__name__}.__all__ names missing {missing}"
