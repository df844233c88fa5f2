"""BoneBreak web demo: ``python app.py`` (see --help); also the Hugging Face Space's entry point. Same as ``bonebreak app``."""

from bonebreak.commands import run

if __name__ == "__main__":
    run("app")
