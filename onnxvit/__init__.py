"""onnxvit: prune, quantize and benchmark timm vision transformers for ONNX Runtime on CPUs and phones."""

# The one project version (pyproject.toml reads it): part of every cache key, bumped with CHANGELOG.md.
__version__ = "0.3.0"
