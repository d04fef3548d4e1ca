"""Inference backends: one file per ``inference.backend`` value, each owning its facts."""
