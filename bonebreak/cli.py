"""The argument parser every command uses: typed dataclasses through ``HfArgumentParser``.

Two things the stock parser gets wrong for our users: a help text that already explains its
default (``$BONEBREAK_DATA, else data/bone-break``) gets a second "(default: None)" appended,
and the ``--no_*`` flag made for each boolean that defaults to True repeats the positive help
("Decode every image once...") with "(default: False)", which reads as the opposite of what it
does. Here each default is shown once and each ``--no_*`` flag says what it turns off.
"""

from __future__ import annotations

import argparse
from typing import Any

from transformers import HfArgumentParser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" only where the help does not already speak of the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text.lower() or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def argument_parser(*dataclass_types: Any) -> HfArgumentParser:
    parser = HfArgumentParser(dataclass_types, formatter_class=HelpFormatter)
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            first_sentence = (action.help or "").split(". ")[0].split("; ")[0].rstrip(".")
            action.help = f"Turn off --{action.dest} (on by default: {first_sentence[:1].lower() + first_sentence[1:]})."
    return parser


def parse(dataclass_type: Any, argv: list[str] | None = None) -> Any:
    """Parse ``argv`` (default: the command line) into one dataclass."""
    (args,) = argument_parser(dataclass_type).parse_args_into_dataclasses(args=argv)
    return args
