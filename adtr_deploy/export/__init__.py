"""Export to TorchScript, ONNX and TensorRT, each verified against the PyTorch reference."""
