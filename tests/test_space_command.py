"""The README's "Deploy as a Space" command, read as the installed `hf` CLI reads it (fast: the network
calls are replaced). What it uploads, and that those files alone serve, is tests/test_space.py."""

from __future__ import annotations

import re
import shlex
from unittest import mock

from conftest import REPO

README = REPO / "README.md"


def upload_command() -> list[str]:
    """The one `hf upload` command of README.md's fenced code blocks (backslash continuations joined)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [line for line in lines if line.startswith("hf upload ")]
    assert len(commands) == 1, f"expected one `hf upload` command in README.md, found {commands}"
    return shlex.split(commands[0], comments=True)


def patterns(command: list[str]) -> tuple[list[str], list[str]]:
    include, exclude = [], []
    for flag, value in zip(command, command[1:]):
        if flag in ("--include", "--exclude"):
            (include if flag == "--include" else exclude).append(value)
    assert not any(arg.startswith(("--include=", "--exclude=")) for arg in command), "use `--include PATTERN`"
    return include, exclude


def test_readme_command_parses_as_the_installed_cli_reads_it():
    """Run the README command through the real `hf` CLI with the network calls replaced."""
    from huggingface_hub import HfApi
    from huggingface_hub.cli.hf import app

    command = upload_command()
    assert command[:2] == ["hf", "upload"] and command[3] == "." and "--repo-type" in command
    calls = {}

    class Created:
        repo_id = command[2]

    with mock.patch.object(HfApi, "create_repo", lambda self, **kw: calls.update(create=kw) or Created()), \
         mock.patch.object(HfApi, "upload_folder", lambda self, **kw: calls.update(upload=kw) or "https://example.invalid"):
        app.main(command[1:], standalone_mode=False)
    include, exclude = patterns(command)
    assert calls["create"]["repo_type"] == "space" and calls["create"]["space_sdk"] == "gradio"
    upload = calls["upload"]
    assert (upload["folder_path"], upload["path_in_repo"], upload["repo_type"]) == (".", ".", "space")
    assert upload["allow_patterns"] == include and upload["ignore_patterns"] == exclude
    assert upload["delete_patterns"] is None
