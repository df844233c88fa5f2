"""BoneBreak: classify bone-fracture types in X-ray images, evaluate honestly, serve a demo.

A research demo trained on a small public dataset; not a diagnostic device. The folders: ``common`` and
``data`` (files, images, splits), ``serving`` (the request path, no PyTorch), ``models``, ``audit``,
``evaluation``, ``training`` (the product), ``lab`` (how recipes are chosen) and ``commands`` (the
``bonebreak`` console command). docs/architecture.md has the map.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bonebreak")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
