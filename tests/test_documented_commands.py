"""Every `fedmedclip ...` command line the documentation shows names a command and flags the command line has:
a flag renamed or dropped in the code, or written in a README that the parser never had, fails here (the
parser is the real one, with every installed layer's commands)."""

from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted(
    path
    for path in {
        REPO / "README.md",
        *REPO.glob("docs/*.md"),
        *REPO.glob("*/README.md"),
        *REPO.glob("*/*/README.md"),
        *REPO.glob("infra/**/*.md"),
    }
    if not any(part.startswith(".") for part in path.relative_to(REPO).parts)  # tools' caches, the venv
)
# A command as the docs write it: after `fedmedclip ` (optionally `.venv/bin/`), up to the end of the code span,
# the line, a pipe, a `;`, a comment or a closing parenthesis; shell continuations joined first.
COMMAND = re.compile(r"(?:^|[\s`(])(?:\.venv/bin/)?fedmedclip ([a-z][\w-]*(?: [^`\n|;#)]*)?)")


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


@functools.cache
def _parser() -> argparse.ArgumentParser:
    from fedmedclip.cli import build_parser

    return build_parser()


def documented_commands(text: str):
    """(command path, flag, the flags its parser knows, the command as written) for each `--flag` of each
    documented command line."""
    root = _parser()
    for match in COMMAND.finditer(re.sub(r"\\\n\s*", " ", text)):
        words, parser, path = match.group(1).split(), root, []
        while words and words[0] in _subcommands(parser):
            parser = _subcommands(parser)[words[0]]
            path.append(words.pop(0))
        if not path:  # prose ("fedmedclip implements ..."), not a command
            continue
        for word in words:
            flag = re.sub(r"[^\w-].*$", "", word[2:]) if word.startswith("--") else ""
            if flag:
                yield " ".join(path), f"--{flag}", parser._option_string_actions, match.group(1)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_documented_flag_exists(doc):
    unknown = [
        f"`fedmedclip {path}` has no {flag} (written as `fedmedclip {written.strip()}`)"
        for path, flag, known, written in documented_commands(doc.read_text())
        if flag not in known
    ]
    assert not unknown, "\n".join(unknown)


def test_the_check_finds_a_flag_no_command_has():
    text = (
        "run `fedmedclip train --rounds 3 --bogus 1`, then\n.venv/bin/fedmedclip serve m.onnx \\\n  --nope\n"
    )
    found = [(path, flag) for path, flag, known, _ in documented_commands(text) if flag not in known]
    assert found == [("train", "--bogus"), ("serve", "--nope")]
    assert len(list(documented_commands(text))) == 3  # --rounds is read, and known


# Flags of other tools that the docs show beside ours (a `kubectl`, `checkov`, `stress-ng` line), and the
# development section's example of a field being added (`--patience`, which exists only in that example).
OTHER_TOOLS_FLAGS = {
    "--cert", "--key", "--for",  # kubectl
    "--compact", "--framework",  # checkov
    "--cpu",  # stress-ng
    "--local-dir",  # huggingface-cli
    "--subprocesses",  # py-spy
    "--patience",  # README, development: the example field
}  # fmt: skip
# A flag as prose writes it: not `--dp-` or `--dp-*` (a family of flags), not part of a longer word.
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?![\w*-])")


def _flags_anywhere() -> set[str]:
    """Every flag the project's command lines know: the `fedmedclip` parser's, and those its scripts (bench/,
    infra/, the CI script, the Makefile, pyproject.toml's pytest options) spell out."""
    known: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        known.update(flag for flag in parser._option_string_actions if flag.startswith("--"))
        for sub in _subcommands(parser).values():
            walk(sub)

    walk(_parser())
    sources = [p for p in REPO.rglob("*.py") if not any(x.startswith(".") or x == "tests" for x in p.parts)]
    for path in [
        *sources,
        *REPO.glob(".ci/*"),
        REPO / "Makefile",
        REPO / "pyproject.toml",
        REPO / "Dockerfile",
    ]:
        known.update(FLAG.findall(path.read_text()))
    return known


def test_every_flag_the_prose_names_exists():
    """A `--flag` anywhere in the docs, prose included (the check above reads `fedmedclip ...` lines only), is
    one some command line of the project knows, or another tool's the docs show beside ours."""
    known = _flags_anywhere() | OTHER_TOOLS_FLAGS
    unknown = sorted(
        f"{doc.relative_to(REPO)}: {flag}" for doc in DOCS for flag in set(FLAG.findall(doc.read_text()))
        if flag not in known
    )  # fmt: skip
    assert not unknown, "\n".join(unknown)
    assert FLAG.findall("the `--dp-*` flags, `--rounds 3` and --no-gpu; not --dp- nor x--y") == [
        "--rounds",
        "--no-gpu",
    ]
