"""onnxvit: prune, quantize and benchmark timm vision transformers for ONNX Runtime on CPUs and phones."""

__version__ = "0.1.0"
