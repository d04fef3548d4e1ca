"""Batch inference behind one interface: in-process transformers, or an OpenAI-compatible server."""
