"""Inference: sliding-window prediction, test-time mirroring, inversion to the input's geometry, writers."""
