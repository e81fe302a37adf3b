"""MINDIR / ONNX export and verification."""
