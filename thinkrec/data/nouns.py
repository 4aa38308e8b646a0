"""What the items of a data set are called ("movie"/"movies", "game"/"games"): chosen at preparation,
stored in the records' metadata.json, and read by the prompt templates, the synthesised reasons and
the teacher prompts, so that no sentence names a domain the data is not about."""

from __future__ import annotations

from typing import Optional

from thinkrec.utils.errors import InputError


# MovieLens, the data of the published method; every other source names its own items.
DEFAULT_ITEM_NOUN = "movie"
DEFAULT_ITEM_NOUN_PLURAL = "movies"


def check_item_nouns(item_noun: Optional[str], item_noun_plural: Optional[str], where: str) -> dict[str, str]:
    """`{"item_noun": ..., "item_noun_plural": ...}` after checking both are set, one line and not empty."""
    nouns = {"item_noun": item_noun, "item_noun_plural": item_noun_plural}
    for name, value in nouns.items():
        if not isinstance(value, str) or not value.strip() or "\n" in value or "<" in value:
            raise InputError(
                f"{where}: {name} must be a word or two naming the items (e.g. 'game' / 'games', 'product' / "
                f"'products'), found {value!r}."
            )
    return {name: value.strip() for name, value in nouns.items()}


def item_nouns_from_metadata(metadata: dict, where: Optional[str] = None) -> dict[str, str]:
    """The item nouns of prepared records (their metadata.json), as keyword arguments for the collator,
    the synthesiser and the teachers; `where` names the records in errors (default: their source)."""
    where = where or f"records of {metadata.get('source', 'unknown source')}"
    if "item_noun" not in metadata or "item_noun_plural" not in metadata:
        raise InputError(
            f"{where}: metadata.json has no item_noun / item_noun_plural (records prepared before the item noun "
            "was a setting); prepare them again with prepare_data.py --item_noun NOUN --item_noun_plural NOUNS."
        )
    return check_item_nouns(metadata["item_noun"], metadata["item_noun_plural"], f"{where}/metadata.json")
