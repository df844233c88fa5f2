"""Train a BoneBreak model: ``python train.py`` or ``accelerate launch train.py`` (see --help). Same as ``bonebreak train``."""

from bonebreak.commands import run

if __name__ == "__main__":
    run("train")
