"""Public names imported on first use (PEP 562 module ``__getattr__``)."""

from __future__ import annotations

import importlib
from typing import Any


def lazy_attribute(namespace: dict[str, Any], package: str, table: dict[str, str], name: str,
                   *, submodules: bool = False) -> Any:
    """Resolve ``name`` of ``package`` from ``table`` (name → relative module), caching it in ``namespace``.

    With ``submodules``, another public ``name`` is tried as a subpackage
    (``chunkem.io``). Raises AttributeError like a missing attribute.
    """
    if name in table:
        value = getattr(importlib.import_module(table[name], package), name)
        namespace[name] = value
        return value
    if submodules and not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", package)
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{name}":
                raise
    raise AttributeError(f"module {package!r} has no attribute {name!r}")
