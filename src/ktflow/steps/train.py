"""Placeholder until the family refactor lands."""

from ktflow.train.run import configure, main

__all__ = ["configure", "main"]
