"""Differential fuzzer (issue 16): random small ONNX graphs with normalizations, optimized and compared."""
