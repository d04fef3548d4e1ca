"""Placeholder until the family refactor lands."""

from ktflow.cast.cli import configure, main

__all__ = ["configure", "main"]
