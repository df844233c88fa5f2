"""Networks (PyTorch): build a classifier by name or Hub id, save and load checkpoints, export them to ONNX,
and the PyTorch forward that serving uses when a checkpoint has no ONNX copy."""
