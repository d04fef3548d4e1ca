"""Placeholder until the family refactor lands."""

from ktflow.adapters import configure, main

__all__ = ["configure", "main"]
