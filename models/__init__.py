"""What is trained: the ONNX model zoo, HeteroFL tiers and slicing, per-tier training artifacts."""
