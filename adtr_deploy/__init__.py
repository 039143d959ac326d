"""adtr-deploy: train, export and deploy ADTR anomaly detection models.

Importing this package imports nothing heavy (no torch, no onnxruntime): the runtime must run on edge devices without torch.
"""

__version__ = "0.1.0"
