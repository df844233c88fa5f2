"""The README's "Deploy as a Space" commands, read as the installed tools read them (fast: the network calls are
replaced): `bonebreak export-space` writes a folder and `hf upload` sends that folder, whole, to a Gradio Space.
What the folder holds and that it serves alone is tests/test_space.py."""

from __future__ import annotations

import re
import shlex
from unittest import mock

from bonebreak.commands.export_space import ExportSpaceArguments
from bonebreak.common.argument_parser import parse
from conftest import REPO

README = REPO / "README.md"


def readme_command(program: str) -> list[str]:
    """The one `<program> ...` command of README.md's fenced code blocks (backslash continuations joined)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [line for line in lines if line.startswith(f"{program} ")]
    assert len(commands) == 1, f"expected one `{program}` command in README.md, found {commands}"
    return shlex.split(commands[0], comments=True)


def test_readme_exports_a_folder_and_uploads_that_folder_whole_to_a_gradio_space(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.cli.hf import app

    export = readme_command("bonebreak export-space")
    arguments = parse(ExportSpaceArguments, export[2:])
    assert (REPO / arguments.model_path / "model.onnx").is_file()

    upload = readme_command("hf upload")
    assert upload[:2] == ["hf", "upload"] and "--repo-type" in upload
    (tmp_path / arguments.output).mkdir()  # as export-space leaves it (the CLI checks that the folder exists)
    monkeypatch.chdir(tmp_path)
    calls = {}

    class Created:
        repo_id = upload[2]

    with mock.patch.object(HfApi, "create_repo", lambda self, **kw: calls.update(create=kw) or Created()), \
         mock.patch.object(HfApi, "upload_folder", lambda self, **kw: calls.update(upload=kw) or "https://example.invalid"):
        app.main(upload[1:], standalone_mode=False)
    assert calls["create"]["repo_type"] == "space" and calls["create"]["space_sdk"] == "gradio"
    sent = calls["upload"]
    assert sent["folder_path"].rstrip("/") == arguments.output.rstrip("/"), "hf upload must send the folder export-space wrote"
    assert (sent["path_in_repo"], sent["repo_type"]) == (".", "space")
    assert sent["allow_patterns"] is None and sent["ignore_patterns"] is None and sent["delete_patterns"] is None
