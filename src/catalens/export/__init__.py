"""catalens.export: one ONNX graph per model (pixels → every task's probabilities), int8 QDQ.

- :func:`catalens.export.onnx.export_onnx` / ``catalens export MODEL``: ``MODEL/model.onnx`` +
  ``onnx.json`` (description + parity with torch).
- :class:`catalens.export.onnx.OnnxModel`: run an exported graph with ONNX Runtime.
- :func:`catalens.export.quantize.quantize_int8` / ``catalens export MODEL --int8``.
"""
from catalens.export.onnx import ExportError, OnnxModel, ensure_onnx, export_onnx, read_description

__all__ = ["ExportError", "OnnxModel", "ensure_onnx", "export_onnx", "read_description"]
