"""Reading item metadata the same way everywhere: a title without its "(1995)" year, and the
"|"-separated genres of the item table."""

from __future__ import annotations

import re


TITLE_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")


def strip_year(title) -> str:
    """`title` without a trailing "(YYYY)"."""
    return TITLE_YEAR.sub("", str(title or ""))


def split_genres(value) -> list[str]:
    """The genres of an item-table `genres` value ("Action|Crime" -> ["Action", "Crime"]; empty -> [])."""
    return [genre.strip() for genre in str(value or "").split("|") if genre.strip()]


__all__ = ["TITLE_YEAR", "split_genres", "strip_year"]
