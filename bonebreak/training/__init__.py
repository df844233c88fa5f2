"""Training (``bonebreak train``): arguments, the machine's set-up, augmentation, the Trainer with its recipe
options, cross-validation, and the after-training steps that package a checkpoint."""
