"""Readers shared by the steps: task rows, one JSON object, a safetensors header."""
