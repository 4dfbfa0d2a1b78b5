"""Deterministic synthetic corpora: the offline default of every downloader.

Each generator is a pure function of a ``random.Random`` (seeded by the caller),
so the same seed always yields the same data on any machine.
"""
