"""The lowest layer: helpers every other part may use (frames, tensors, output files, YAML, wrappers)."""
