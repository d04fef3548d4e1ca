"""Placeholder until the family refactor lands."""

from ktflow.infer.cli import configure, main

__all__ = ["configure", "main"]
