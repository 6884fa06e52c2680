"""``main`` builds only the named verb's subcommand; what the user sees must not depend on that."""

from __future__ import annotations

import contextlib
import io

import pytest

from bundler import cli

#: A command line each verb accepts (the rest of the CLI tests run them for real).
SAMPLE_ARGS = {
    "pack": ["d", "-o", "o"], "unpack": ["f", "--into", "d"], "verify": ["f"], "inspect": ["f", "--json"],
    "push": ["d", "--ref", "r"], "warm": ["--ref", "r", "--", "true"], "pull": ["--ref", "r", "--into", "d"],
    "export": ["--ref", "r", "-o", "o"], "import": ["f"], "ls": ["--json"], "show": ["r"], "rm": ["r"],
    "gc": ["--keep-last", "3"], "cache": ["--prune"], "explain": ["--tag", "t"], "keygen": ["p"],
}


@pytest.fixture(autouse=True)
def _wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no wrapping inside the texts compared below


def _help(parser, argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        parser.parse_args(argv)
    assert exit_.value.code == 0
    return out.getvalue()


def test_main_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert list(cli.VERBS) == list(SAMPLE_ARGS) == list(cli.EXAMPLES)
    for verb, (_, summary, _) in cli.VERBS.items():
        assert f"\n    {verb} " in text and f" {summary}\n" in text, verb


@pytest.mark.parametrize("verb", list(cli.VERBS))
def test_a_verb_alone_reads_as_with_all_verbs(verb):
    """Help, and what parses, are the same from the one-verb parser main builds and the full one."""
    alone, full = cli.build_parser(verb), cli.build_parser()
    assert _help(alone, [verb, "--help"]) == _help(full, [verb, "--help"])
    assert f"example:\n  bundler {verb}" in _help(alone, ["-v", verb, "-h"])
    argv = ["-v", verb, *SAMPLE_ARGS[verb], "-q"]
    assert vars(alone.parse_args(argv)) == vars(full.parse_args(argv))


@pytest.mark.parametrize(("argv", "verb"), [
    (["unpack", "b", "--into", "d"], "unpack"), (["-vq", "--verbose", "pack", "d"], "pack"),
    (["-q", "ls", "--help"], "ls"), ([], None), (["-v"], None), (["--help", "unpack"], None),
    (["-h", "pack"], None), (["--version", "ls"], None), (["--", "unpack"], None), (["-", "unpack"], None),
    (["--verb", "unpack"], None), (["-x", "unpack"], None), (["pus", "x"], None), (["Pack"], None),
])
def test_only_a_verb_nothing_can_reinterpret_is_built_alone(argv, verb):
    assert cli._verb_to_build(argv) == verb
