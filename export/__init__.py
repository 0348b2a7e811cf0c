"""PyTorch → ONNX export and ONNX graph-rewrite passes. Makes no pruning decisions."""
