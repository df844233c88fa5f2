"""The argument parser every command uses: typed dataclasses through ``HfArgumentParser``.

Two things the stock parser gets wrong for our users, fixed in the help formatter (argparse's
documented place for it, so no parser internals are edited): a help text that already explains
its default (``$BONEBREAK_DATA, else data/bone-break``) gets a second "(default: None)", and the
``--no_*`` flag made for each boolean that defaults to True repeats the positive help with
"(default: False)", which reads as the opposite of what it does. Here each default is shown once
and each ``--no_*`` flag says what it turns off.
"""

from __future__ import annotations

import argparse
from typing import Any

from transformers import HfArgumentParser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" only where the help does not already speak of the default; word --no_* flags as switches."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        option = action.option_strings[0] if action.option_strings else ""
        if isinstance(action, argparse._StoreFalseAction) and option.startswith("--no_"):
            first_sentence = text.split(". ")[0].split("; ")[0].rstrip(".")
            return f"Turn off --{action.dest} (on by default: {first_sentence[:1].lower() + first_sentence[1:]})."
        if "(default" in text.lower() or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def argument_parser(*dataclass_types: Any, prog: str | None = None, description: str | None = None) -> HfArgumentParser:
    return HfArgumentParser(dataclass_types, formatter_class=HelpFormatter, prog=prog, description=description)


def parse(dataclass_type: Any, argv: list[str] | None = None, prog: str | None = None, description: str | None = None) -> Any:
    """Parse ``argv`` (default: the command line) into one dataclass."""
    (args,) = argument_parser(dataclass_type, prog=prog, description=description).parse_args_into_dataclasses(args=argv)
    return args
