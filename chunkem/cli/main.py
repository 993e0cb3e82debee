"""``chunkem <verb> INPUTS [--options]``.

Every module in :mod:`chunkem.cli` that defines ``add_args(parser)`` and
``main(args) -> int`` is a verb; its name (``_`` → ``-``) is the verb and its
module docstring is the help text (first line = summary, the rest shown by
``chunkem VERB --help``, examples included).

Errors that chunkem raises on purpose (:class:`chunkem.errors.ChunkemError`)
are printed as one line ``chunkem VERB: error: ...`` with exit code 2, never
as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

from ..errors import ChunkemError

_NOT_VERBS = {"main", "common"}


def _verb_modules() -> dict[str, ModuleType]:
    from .. import cli as pkg

    verbs: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in _NOT_VERBS:
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(mod, "add_args") and hasattr(mod, "main"):
            verbs[info.name.replace("_", "-")] = mod
    return verbs


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="chunkem",
        description="Chunked cryo-EM map and tomogram processing on Dask. "
        "Start with `chunkem demo`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"chunkem {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, mod in _verb_modules().items():
        doc = (mod.__doc__ or name).strip()
        summary = doc.splitlines()[0]
        p = sub.add_parser(
            name,
            help=summary,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_args(p)
        p.set_defaults(_verb_main=mod.main, _verb_name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 1
    try:
        rc = args._verb_main(args)
    except ChunkemError as exc:
        print(f"chunkem {args._verb_name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"chunkem {args._verb_name}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
