"""Reading a fracture dataset: decode any image safely, preprocess it for a model, find the dataset's
layout, split it without leaks, and change what a run trains on. ``decode`` and ``preprocess`` need
only numpy and Pillow, because serving uses them too."""
