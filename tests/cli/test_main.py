"""The CLI dispatcher: verbs are discovered, errors are one line with exit code 2."""

from __future__ import annotations

import argparse

import pytest

from chunkem.cli import main as climain
from chunkem.errors import InputFileError


def test_every_verb_has_help_with_an_example(capsys):
    verbs = climain._verb_modules()
    assert "demo" in verbs
    for name, mod in verbs.items():
        doc = mod.__doc__ or ""
        assert "Example" in doc, f"chunkem {name}: help text has no example"
        with pytest.raises(SystemExit) as exc:
            climain.main([name, "--help"])
        assert exc.value.code == 0
        assert name in capsys.readouterr().out


def test_chunkem_error_is_one_line_without_traceback(monkeypatch, capsys):
    def boom(args: argparse.Namespace) -> int:
        raise InputFileError("missing.mrc: no such file")

    parser = climain.build_parser()
    real_parse = parser.parse_args

    def parse(argv=None):
        ns = real_parse(argv)
        ns._verb_main = boom
        return ns

    monkeypatch.setattr(climain, "build_parser", lambda only=None: parser)
    monkeypatch.setattr(parser, "parse_args", parse)
    rc = climain.main(["demo"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == "chunkem demo: error: missing.mrc: no such file"
    assert "Traceback" not in err


def test_no_verb_prints_help(capsys):
    assert climain.main([]) == 1
    assert "chunkem demo" in capsys.readouterr().out


def test_running_a_verb_builds_only_that_verb(monkeypatch):
    built: list[str | None] = []
    real = climain.build_parser

    def spy(only=None):
        built.append(only)
        return real(only)

    monkeypatch.setattr(climain, "build_parser", spy)
    with pytest.raises(SystemExit):
        climain.main(["info", "--help"])
    assert built == ["info"]
    parser = real("info")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"info"}
    # an unknown word falls back to the full parser, which names the valid verbs
    assert climain._requested_verb(["no-such-verb"]) is None
    assert climain._requested_verb(["--version"]) is None
    assert climain._requested_verb(["local-filter", "x.mrc"]) == "local-filter"
