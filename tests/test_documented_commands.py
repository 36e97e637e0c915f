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
