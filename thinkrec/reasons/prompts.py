"""The text a teacher is asked: its system message and the question for one row (history, target and
the true answer as a hint). Both teachers, local and remote, send these."""

from __future__ import annotations

from thinkrec.data.nouns import DEFAULT_ITEM_NOUN, DEFAULT_ITEM_NOUN_PLURAL
from thinkrec.reasons.base import as_list, quoted


TEACHER_SYSTEM = (
    "You explain {item_noun} recommendations. You are told the true answer; justify it from the user's history "
    "in two to four sentences. Start with \"Yes.\" or \"No.\" exactly as given."
)


def teacher_system(item_noun: str = DEFAULT_ITEM_NOUN) -> str:
    """The teacher's system message (`TEACHER_SYSTEM`) for items called `item_noun`."""
    return TEACHER_SYSTEM.format(item_noun=item_noun)


def teacher_prompt(row: dict, max_history: int = 10, item_noun: str = DEFAULT_ITEM_NOUN,
                   item_noun_plural: str = DEFAULT_ITEM_NOUN_PLURAL) -> str:
    """The question for a teacher: the history, the target and the true answer as a hint."""
    all_titles = as_list(row.get("HisItemTitles"))
    titles = [quoted(str(t)) for t in all_titles[-max_history:]]
    labels = (as_list(row.get("HisItemLabels")) or [1] * len(all_titles))[-max_history:]
    if any(int(label) == 0 for label in labels):
        liked = [t for t, label in zip(titles, labels) if int(label) == 1]
        disliked = [t for t, label in zip(titles, labels) if int(label) == 0]
        history = f"The user liked: {', '.join(liked) or 'none'}. The user disliked: {', '.join(disliked)}."
    else:
        history = f"The user has given high ratings to: {', '.join(titles) or f'no {item_noun_plural} yet'}."
    answer = "Yes" if int(row["label"]) == 1 else "No"
    keywords = as_list(row.get("TargetItemKeywords"))
    about = f" (keywords: {', '.join(str(k) for k in keywords)})" if keywords else ""
    return (
        f"{history}\nWould the user enjoy the {item_noun} {quoted(str(row.get('TargetItemTitle', '')))}{about}?\n"
        f"The true answer is {answer}. Begin with \"{answer}.\" and explain why in a few sentences."
    )


__all__ = ["TEACHER_SYSTEM", "teacher_prompt", "teacher_system"]
