"""The embedded default: a tiny DeepSeek-V3-layout model and two seeded tasks, built locally."""
