"""Placeholder until the family refactor lands."""

from ktflow.int8 import configure, main

__all__ = ["configure", "main"]
