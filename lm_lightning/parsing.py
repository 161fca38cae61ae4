"""Parse errors as one short paragraph: the unknown key, the closest valid ones, the file it came from.

jsonargparse prints the whole usage (about 130 lines for ``fit``) before the one line that matters; these
parsers print only that line, with ``difflib`` suggestions, and exit with code 2. ``--help`` is unchanged.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)", re.S)
_NOT_ACCEPTED = re.compile(r"does not accept (?:option|key) '([^']+)'")
_BAD_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


def valid_keys(parser: Any) -> list[str]:
    """The ``--section.key`` options of ``parser`` (nested classes' keys included once they are known)."""
    keys = []
    for action in parser._actions:
        keys += [o for o in action.option_strings if o.startswith("--")]
    return keys


def suggest(key: str, candidates: list[str]) -> list[str]:
    """The closest candidates to a mistyped ``key`` (at most 3), best first."""
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if not close:  # a wrong section ('--batch_size' for '--data.batch_size'): match the last part alone
        last = key.rsplit(".", 1)[-1].lstrip("-")
        tails = {c.rsplit(".", 1)[-1].lstrip("-"): c for c in reversed(candidates)}
        close = [tails[t] for t in difflib.get_close_matches(last, list(tails), n=3, cutoff=0.75)]
    return close


def config_files(argv: list[str]) -> list[str]:
    """The files given with ``--config FILE`` (or ``--config=FILE``) on a command line."""
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def file_with_key(files: list[str], dotted: str) -> str | None:
    """The last of ``files`` whose YAML holds the ``section.key`` path ``dotted`` (what jsonargparse read)."""
    *sections, last = dotted.split(".")
    for name in reversed(files):
        try:
            node: Any = yaml.safe_load(Path(name).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            return name
    return None


def short_message(message: str, parser: Any, argv: list[str]) -> str:
    """jsonargparse's error ``message`` rewritten for a person: what was wrong and what would be valid."""
    help_tip = f"(`{parser.prog.replace(' [options]', '')} --help` lists every setting)"
    if match := _UNRECOGNIZED.search(message):
        words = match.group(1).split()
        unknown = [w.split("=", 1)[0] for w in words if w.startswith("-")] or words[:1]
        lines = []
        for key in unknown:
            close = suggest(key, valid_keys(parser))
            hint = f"; did you mean {' or '.join(close)}?" if close else "."
            lines.append(f"unknown option {key}{hint}")
        return "\n".join([*lines, help_tip])
    if match := _NOT_ACCEPTED.search(message):
        dotted = match.group(1)
        close = [c.removeprefix("--") for c in suggest(f"--{dotted}", valid_keys(parser))]
        hint = f"; did you mean {' or '.join(close)}?" if close else "."
        where = file_with_key(config_files(argv), dotted)
        origin = f"{where}: " if where else ""
        return f"{origin}unknown key {dotted}{hint}\n{help_tip}"
    if match := _BAD_CHOICE.search(message):
        choices = re.findall(r"'([^']*)'", match.group(2))
        close = difflib.get_close_matches(match.group(1), choices, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else f"; choose one of {', '.join(choices)}."
        return f"unknown subcommand {match.group(1)!r}{hint}"
    return f"{message.strip()}\n{help_tip}"


class ShortErrors:
    """A jsonargparse parser mix-in: a parse error prints :func:`short_message` (not the usage), exit 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse trying one type of a union: not the user's error yet
            return super().error(message, ex)  # type: ignore[misc]
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"error: {short_message(message, parser, _ARGV)}", file=sys.stderr)
        raise SystemExit(2)


_ARGV: list[str] = []  # the command line being parsed (in-process, sys.argv is the caller's)


def remember_argv(args: list[str] | None) -> None:
    """Record the command line being parsed (``None``: ``sys.argv``), so that an error can name its file."""
    _ARGV[:] = sys.argv[1:] if args is None else list(args)


def parsed_argv() -> list[str]:
    """The command line being parsed (see ``remember_argv``)."""
    return list(_ARGV)


class CLIParser(ShortErrors, LightningArgumentParser):
    """LightningCLI's parser with short errors."""


class ExportParser(ShortErrors, ArgumentParser):
    """The ``export`` command's parser with short errors."""
