"""BoneBreak: classify bone-fracture types in X-ray images, evaluate honestly, serve a demo.

A research demo trained on a small public dataset; not a diagnostic device.
"""

__version__ = "0.1.0"
