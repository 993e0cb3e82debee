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


def _verb_names() -> list[str]:
    """Module names of the candidate verbs (found without importing them)."""
    from .. import cli as pkg

    return sorted(info.name for info in pkgutil.iter_modules(pkg.__path__)
                  if not info.name.startswith("_") and info.name not in _NOT_VERBS)


def _verb_modules(only: str | None = None) -> dict[str, ModuleType]:
    """Import the verb modules (all, or only the module of verb ``only``)."""
    from .. import cli as pkg

    verbs: dict[str, ModuleType] = {}
    for name in _verb_names():
        if only is not None and name != only.replace("-", "_"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{name}")
        if hasattr(mod, "add_args") and hasattr(mod, "main"):
            verbs[name.replace("_", "-")] = mod
    return verbs


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``chunkem`` parser with every verb, or with verb ``only`` alone.

    Building every sub-parser imports every verb module (about 0.3 s), so
    :func:`main` builds only the verb it is asked to run.
    """
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="chunkem",
        description="Chunked cryo-EM map and tomogram processing on Dask. "
        "Start with `chunkem demo`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"chunkem {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, mod in _verb_modules(only).items():
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


def _requested_verb(argv: list[str]) -> str | None:
    """The verb named on the command line, when it is a known one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first.replace("-", "_") in _verb_names():
        return first
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_requested_verb(argv))
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
