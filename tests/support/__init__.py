"""Test-only helpers: synthetic checkpoints and reference kernels."""
