"""Answering requests (numpy, Pillow and ONNX Runtime only, so a Space serves without PyTorch): load a checkpoint,
classify an image with one decode and one forward pass, the heat map and the X-ray check, batch prediction
and the Gradio app."""
