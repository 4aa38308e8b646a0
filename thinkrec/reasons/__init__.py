"""Reasons: sources (synthesiser, teachers), reflection and judging."""
