"""Plumbing shared by every part of the library: atomic writes, argument parsing, dtypes, seeded
subsets, input errors. One home each; nothing here knows about recommendation."""
