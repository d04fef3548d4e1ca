"""Placeholder until the family refactor lands."""

from ktflow.doctor import configure, main

__all__ = ["configure", "main"]
