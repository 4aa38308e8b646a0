"""Reward functions for a GRPO stage on trl's `GRPOTrainer` (read against trl 1.16.0).

trl calls every reward as `reward(prompts=..., completions=..., completion_ids=..., **columns)`
(`GRPOTrainer._calculate_rewards`): `completions` are decoded strings (a list of one assistant message
each for conversational prompts), `columns` are the row's dataset columns, one value per completion
(rows already repeated `num_generations` times), plus `trainer_state`, `log_extra` and `log_metric`.
A reward returns one `float | None` per completion (None: not applicable, NaN to trl); trl logs it as
`rewards/<__name__>/mean|std` and sums the rewards with `GRPOConfig.reward_weights`.

Two answer formats: `answer_first` ("Yes. <reason>", the reason templates) and `think_first`
(reasoning, then a last line "Answer: Yes." / "Answer: No.", see `FINAL_VERDICT`). The parsing and the
measures are the judge's (`reporting.verdict_of` / `reason_body`, `judge.Grounding`, `judge.StanceChecker`,
`judge.repeated_ngram_rate`); this module only turns them into per-completion rewards.

>>> funcs, weights = build_rewards(["verdict_correct", "format"], [1.0, 0.2], answer_format="think_first")
>>> [f.__name__ for f in funcs], weights
(['verdict_correct', 'format'], [1.0, 0.2])
>>> funcs[0](completions=["The user loves heists.\\nAnswer: Yes.", "Answer: No."], label=[1, 1])
[1.0, 0.0]
"""

from __future__ import annotations

import math
import re
from numbers import Real
from typing import Callable, Optional, Sequence

from thinkrec.evaluation.reporting import reason_body, verdict_of
from thinkrec.reasons.base import word_count
from thinkrec.reasons.judge import Grounding, StanceChecker, repeated_ngram_rate, words
from thinkrec.utils.errors import InputError


ANSWER_FORMATS = ("answer_first", "think_first")
# think_first: the completion's last line is the verdict, in this one form ("Answer: Yes." / "Answer: No").
FINAL_VERDICT = re.compile(r"(?:\A|\n)[ \t]*answer[ \t]*:[ \t]*(yes|no)\b[ \t.!]*\s*\Z", re.IGNORECASE)
ROW_KEYS = ("UserID", "TargetItemID")
# Keys trl adds to the dataset columns; they are not per-row lists.
TRAINER_KEYS = ("trainer_state", "log_extra", "log_metric", "environments")
_TRAILING_ARTICLE = re.compile(r" (the|a|an)$")  # "shawshank redemption the" (from "Shawshank Redemption, The")


def completion_text(completion) -> str:
    """The text of one completion as trl passes it: a string, or a list of messages (the assistant's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        parts = []
        for message in completion:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}, ...]
                content = "".join(block.get("text", "") for block in content if isinstance(block, dict))
            parts.append(content or "")
        return "".join(parts)
    if completion is None:
        return ""
    raise TypeError(f"a completion should be a string or a list of messages; found {type(completion).__name__}.")


def split_answer(text: str, answer_format: str) -> tuple[Optional[int], str]:
    """(verdict 1 Yes / 0 No / None, body): `answer_first` reads the leading verdict and the reason after it;
    `think_first` reads the final "Answer: Yes/No" line and the reasoning before it."""
    text = text or ""
    if answer_format == "answer_first":
        return verdict_of(text), reason_body(text)
    if answer_format == "think_first":
        match = FINAL_VERDICT.search(text)
        if match is None:
            return None, text.strip()
        return (1 if match.group(1).lower() == "yes" else 0), text[: match.start()].strip()
    raise ValueError(f"answer_format must be one of {list(ANSWER_FORMATS)}; found {answer_format!r}.")


def describe_row(index: int, columns: dict) -> str:
    """"row 3 (UserID 7, TargetItemID 12)": the row's index in the batch and its ids where the columns carry them."""
    ids = []
    for key in ROW_KEYS:
        values = columns.get(key)
        if isinstance(values, (list, tuple)) and index < len(values):
            ids.append(f"{key} {values[index]}")
    return f"row {index}" + (f" ({', '.join(ids)})" if ids else "")


def _column(name: str, columns: dict, needed: Sequence[str], count: int) -> list:
    """The per-row values of dataset column `name`, checked to be a list with one value per completion."""
    if name not in columns:
        found = sorted(key for key in columns if key not in TRAINER_KEYS)
        raise InputError(f"needs the dataset column(s) {list(needed)}; {name!r} is missing (found {found}).")
    values = columns[name]
    if not isinstance(values, (list, tuple)) or len(values) != count:
        size = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise InputError(f"dataset column {name!r}: expected one value per completion ({count}); found {size}.")
    return list(values)


def _label(value, index: int, columns: dict) -> int:
    if isinstance(value, bool) or value not in (0, 1):
        raise InputError(f"{describe_row(index, columns)}: label should be 0 or 1; found {value!r}.")
    return int(value)


class Reward:
    """A reward with trl's call signature: subclasses score the completions' texts against the row columns
    they name in `columns_needed`, and set `__name__` (what trl logs)."""

    columns_needed: tuple[str, ...] = ()

    def __init__(self, name: str, answer_format: str):
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {list(ANSWER_FORMATS)}; found {answer_format!r}.")
        self.__name__, self.answer_format = name, answer_format

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list[Optional[float]]:
        if completions is None:
            raise TypeError(f"reward {self.__name__!r}: no completions given.")
        texts = [completion_text(c) for c in completions]
        values = {name: _column(name, columns, self.columns_needed, len(texts)) for name in self.columns_needed}
        return self.score(texts, values, columns)

    def score(self, texts: list[str], values: dict[str, list], columns: dict) -> list[Optional[float]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__name__!r}, answer_format={self.answer_format!r})"


class VerdictCorrect(Reward):
    """1.0 when the completion's verdict matches the row's `label`, 0.0 when it does not or is missing.
    Needs the `label` column (0/1)."""

    columns_needed = ("label",)

    def __init__(self, answer_format: str):
        super().__init__("verdict_correct", answer_format)

    def score(self, texts, values, columns):
        labels = [_label(v, i, columns) for i, v in enumerate(values["label"])]
        return [float(split_answer(t, self.answer_format)[0] == y) for t, y in zip(texts, labels)]


class VerdictProbability(Reward):
    """A continuous correctness reward from the probability the policy gave "Yes" at its verdict position:
    `kind="brier"` gives 1 - (p - label)^2 (in [0, 1], named `verdict_brier`), `kind="log_likelihood"` gives
    log P(true label), floored at log(`min_probability`) (named `verdict_log_likelihood`).

    Needs `label` and the per-completion column `p_yes_column` (default `verdict_p_yes`), which no record
    carries: the GRPO stage adds it per completion (a rollout function's extra field or the subclass's
    `_generate_and_score_completions`), P("Yes") at the verdict token (answer_first: the first completion
    position, i.e. the model's score; think_first: the token after "Answer:"). None there (no verdict
    written) gets the worst value, never None: trl sums rewards with nansum, where None would count as 0,
    the best log-likelihood."""

    def __init__(self, answer_format: str, kind: str = "brier", p_yes_column: str = "verdict_p_yes",
                 min_probability: float = 1e-4):
        if kind not in ("brier", "log_likelihood"):
            raise ValueError(f"kind must be 'brier' or 'log_likelihood'; found {kind!r}.")
        if not 0 < min_probability < 0.5:
            raise ValueError(f"min_probability must be in (0, 0.5); found {min_probability}.")
        super().__init__(f"verdict_{kind}", answer_format)
        self.kind, self.p_yes_column, self.min_probability = kind, p_yes_column, min_probability
        self.columns_needed = ("label", p_yes_column)

    def score(self, texts, values, columns):
        worst = 0.0 if self.kind == "brier" else math.log(self.min_probability)
        out = []
        for index, (label, p_yes) in enumerate(zip(values["label"], values[self.p_yes_column])):
            label = _label(label, index, columns)
            if p_yes is None:
                out.append(worst)
                continue
            if isinstance(p_yes, bool) or not isinstance(p_yes, Real) or not 0.0 <= float(p_yes) <= 1.0:
                raise InputError(f"{describe_row(index, columns)}: {self.p_yes_column} should be a probability in [0, 1] "
                                 f"or None; found {p_yes!r}.")
            p_true = float(p_yes) if label == 1 else 1.0 - float(p_yes)
            out.append(1.0 - (1.0 - p_true) ** 2 if self.kind == "brier" else math.log(max(p_true, self.min_probability)))
        return out


class FormatReward(Reward):
    """1.0 when the completion has its verdict where the format puts it, a non-empty body, at most
    `max_words` tokens (`count_tokens`: whitespace words by default, the unit reason sources cap references
    in with `max_reason_tokens`; a tokenizer's count works too) and a repeated-`ngram` rate
    (judge.repeated_ngram_rate of the body) of at most `max_repeated_rate`; else 0.0. Needs no column. When
    trl passes `log_metric`, the share of completions failing each check is logged as `format/<check>`."""

    CHECKS = ("verdict_missing", "body_empty", "too_long", "repetition")

    def __init__(self, answer_format: str, max_words: int = 200, ngram: int = 3, max_repeated_rate: float = 0.1,
                 count_tokens: Callable[[str], int] = word_count):
        if max_words < 1 or ngram < 1 or not 0 <= max_repeated_rate < 1:
            raise ValueError(f"format reward: max_words >= 1, ngram >= 1 and max_repeated_rate in [0, 1) are needed; "
                             f"found {max_words}, {ngram}, {max_repeated_rate}.")
        super().__init__("format", answer_format)
        self.max_words, self.ngram, self.max_repeated_rate, self.count_tokens = max_words, ngram, max_repeated_rate, count_tokens

    def failures(self, text: str) -> dict[str, bool]:
        """Which checks `text` fails."""
        verdict, body = split_answer(text, self.answer_format)
        return {"verdict_missing": verdict is None, "body_empty": not words(body), "too_long": self.count_tokens(text) > self.max_words,
                "repetition": repeated_ngram_rate(body, self.ngram) > self.max_repeated_rate}

    def score(self, texts, values, columns):
        failed = [self.failures(text) for text in texts]
        log_metric = columns.get("log_metric")
        if callable(log_metric) and failed:
            for check in self.CHECKS:
                log_metric(f"format/{check}", sum(f[check] for f in failed) / len(failed))
        return [float(not any(f.values())) for f in failed]


def _row_items(values: dict, index: int, columns: dict) -> tuple[int, list[int]]:
    """(target id, history ids) of one row, from the `TargetItemID` and `HisItemIDs` columns."""
    target, history = values["TargetItemID"][index], values["HisItemIDs"][index]
    if history is None or isinstance(history, (str, bytes)) or not hasattr(history, "__iter__"):
        raise InputError(f"{describe_row(index, columns)}: HisItemIDs should be a list of item ids; found {history!r}.")
    return int(target), [int(i) for i in history]


class GroundingReward(Reward):
    """The grounded share of the titles, genres and keywords the body names: names of the row's own target
    and history items (as the prompt shows them) count, others are hallucinated (`judge.Grounding.mentions`,
    the measure judge_reasons.py reports). A body naming nothing gets `no_mentions` (0.0: saying nothing is
    not rewarded; None skips the row). Needs `TargetItemID` and `HisItemIDs`; the titles, genres and keywords
    come from the item table the `Grounding` was built on (`Grounding(items, common_english_words(...))`)."""

    columns_needed = ("TargetItemID", "HisItemIDs")

    def __init__(self, grounding: Grounding, answer_format: str, no_mentions: Optional[float] = 0.0):
        if not isinstance(grounding, Grounding):
            raise TypeError(f"grounding reward: expected a judge.Grounding; found {type(grounding).__name__}.")
        super().__init__("grounding", answer_format)
        self.grounding, self.no_mentions = grounding, no_mentions

    def score(self, texts, values, columns):
        out = []
        for index, text in enumerate(texts):
            target, history = _row_items(values, index, columns)
            found = self.grounding.mentions(split_answer(text, self.answer_format)[1], [target, *history])
            out.append(sum(grounded for _, _, grounded in found) / len(found) if found else self.no_mentions)
        return out


class LinkingReward(Reward):
    """1.0 when the body links the target to the user's history: it names a history item (a title the
    judge's `Grounding` finds, quoted or with its year, or a history title's words unquoted, a trailing
    ", The" dropped; one-word titles that are ordinary words, such as "Big", only quoted), or a keyword the
    target shares with a history item; else 0.0. Genres do not count. Needs `TargetItemID` and `HisItemIDs`;
    titles and keywords come from the `Grounding`'s item table. `common_words`: the ordinary words, e.g.
    `judge.common_english_words([item_noun, item_noun_plural])`."""

    columns_needed = ("TargetItemID", "HisItemIDs")

    def __init__(self, grounding: Grounding, answer_format: str, common_words: Optional[set[str]] = None):
        if not isinstance(grounding, Grounding):
            raise TypeError(f"linking reward: expected a judge.Grounding; found {type(grounding).__name__}.")
        super().__init__("linking", answer_format)
        self.grounding, common = grounding, common_words or set()
        self.title_words: dict[int, str] = {}  # item id -> its title's words, as they may appear unquoted
        for name, item_ids in grounding.titles.items():
            name = _TRAILING_ARTICLE.sub("", name)
            if name and (" " in name or name not in common):
                for item_id in item_ids:
                    self.title_words[item_id] = name

    def links(self, body: str, target: int, history: Sequence[int]) -> bool:
        """Does `body` name one of `history`, or a keyword `target` shares with one of them?"""
        history = [i for i in history if i != target]
        if not history:
            return False
        against_history = self.grounding.mentions(body, history)
        if any(kind == "title" and grounded for kind, _, grounded in against_history):
            return True
        spaced = f" {' '.join(words(body))} "
        if any(f" {self.title_words[i]} " in spaced for i in history if i in self.title_words):
            return True
        of_target = {name for kind, name, grounded in self.grounding.mentions(body, [target]) if kind == "keyword" and grounded}
        return any(kind == "keyword" and grounded and name in of_target for kind, name, grounded in against_history)

    def score(self, texts, values, columns):
        out = []
        for index, text in enumerate(texts):
            target, history = _row_items(values, index, columns)
            out.append(float(self.links(split_answer(text, self.answer_format)[1], target, history)))
        return out


class StanceReward(Reward):
    """1.0 when the body argues for the completion's verdict, as judged by a `judge.StanceChecker` fitted on
    reference reasons (never on the policy's own output, which it would then learn to please); 0.0 when it
    argues the other way, the body is empty or the verdict is missing. Needs no column."""

    def __init__(self, checker: StanceChecker, answer_format: str):
        if not isinstance(checker, StanceChecker):
            raise TypeError(f"stance reward: expected a fitted judge.StanceChecker; found {type(checker).__name__}.")
        super().__init__("stance", answer_format)
        self.checker = checker

    def score(self, texts, values, columns):
        parsed = [split_answer(text, self.answer_format) for text in texts]
        # stances() reads the text after a leading verdict: give every body one, so a think_first body that
        # opens with "No doubt ..." is read whole (the verdict word is never what the checker sees).
        stances = self.checker.stances([f"Yes. {body}" if body else "" for _, body in parsed])
        return [float(verdict is not None and int(stance) == verdict) for (verdict, _), stance in zip(parsed, stances)]


def stance_reward(checker: StanceChecker, answer_format: str) -> StanceReward:
    """The `stance` reward of a checker fitted on references (`StanceChecker.fit(reference_reasons)`)."""
    return StanceReward(checker, answer_format)


# ------------------------------------------------------------------------------------------ checking


def _one_row(columns: dict, index: int, count: int) -> dict:
    """The call's keyword arguments cut to row `index` (lists of `count` values), trl's helpers made silent."""
    row = {}
    for key, value in columns.items():
        if key in ("log_extra", "log_metric"):
            row[key] = lambda *args, **kwargs: None
        elif isinstance(value, (list, tuple)) and len(value) == count:
            row[key] = value[index : index + 1]
        else:
            row[key] = value
    return row


def checked(func: Callable) -> Callable:
    """`func` with its input and output checked, under the same `__name__` (trl logs by it):
    an exception is re-raised as an `InputError` naming the first row that fails alone (index, UserID,
    TargetItemID, the completion's start); a result that is not one finite float or None per completion
    (a NaN, an inf, a wrong length) is a `ValueError` naming the function. An `InputError` the function
    raises itself already names its row (or a missing column): it gets the function's name in front.
    None stays None (trl: not applicable)."""
    name = getattr(func, "__name__", type(func).__name__)

    def reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[Optional[float]]:
        if completions is None:
            raise TypeError(f"reward {name!r}: no completions given.")
        count = len(completions)
        call = dict(columns, prompts=prompts, completions=completions, completion_ids=completion_ids)
        try:
            values = func(**call)
        except InputError as error:
            raise InputError(f"reward {name!r}: {error}") from error
        except Exception as error:
            where = f"the batch of {count} completions (no single row fails alone)"
            for index in range(count):
                try:
                    func(**_one_row(call, index, count))
                except Exception:
                    start = completion_text(completions[index])[:80]
                    where = f"{describe_row(index, columns)}, completion {start!r}"
                    break
            raise InputError(f"reward {name!r} failed on {where}: {type(error).__name__}: {error}") from error
        return _checked_values(name, values, count, columns)

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = getattr(func, "__doc__", None) or type(func).__doc__
    reward.__wrapped__ = func
    return reward


def _checked_values(name: str, values, count: int, columns: dict) -> list[Optional[float]]:
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise ValueError(f"reward {name!r} returned {type(values).__name__}; expected a list of {count} floats or None.")
    if len(values) != count:
        raise ValueError(f"reward {name!r} returned {len(values)} rewards for {count} completions; expected one per completion.")
    out: list[Optional[float]] = []
    for index, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ValueError(f"reward {name!r} returned {value!r} for {describe_row(index, columns)}; expected a float or None.")
        if not math.isfinite(float(value)):
            raise ValueError(f"reward {name!r} returned {float(value)} for {describe_row(index, columns)}; rewards must be finite "
                             "(return None for a completion the reward does not apply to).")
        out.append(float(value))
    return out


# ------------------------------------------------------------------------------------------ building

REWARD_NAMES = ("verdict_correct", "verdict_brier", "verdict_log_likelihood", "format", "grounding", "linking", "stance")


def build_rewards(
    names: Sequence[str],
    weights: Optional[Sequence[float]] = None,
    *,
    answer_format: str,
    grounding: Optional[Grounding] = None,
    stance_checker: Optional[StanceChecker] = None,
    common_words: Optional[set[str]] = None,
    max_words: int = 200,
    max_repeated_rate: float = 0.1,
    no_mentions: Optional[float] = 0.0,
    p_yes_column: str = "verdict_p_yes",
) -> tuple[list[Callable], list[float]]:
    """(reward functions, weights) for `GRPOTrainer(reward_funcs=...)` and `GRPOConfig(reward_weights=...)`,
    each reward wrapped by `checked`. `answer_format` has no default: the wrong one scores every verdict missing. `grounding` (a `judge.Grounding` of the item table) is needed by
    `grounding` and `linking`, `stance_checker` (fitted on references) by `stance`; weights default to 1."""
    names = list(names)
    unknown = [n for n in names if n not in REWARD_NAMES]
    if unknown or not names:
        raise ValueError(f"rewards: unknown name(s) {unknown}; choose from {list(REWARD_NAMES)}." if unknown else
                         f"rewards: no names given; choose from {list(REWARD_NAMES)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"rewards: each name once (trl logs them by name); found {names}.")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names) or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"rewards: one finite weight per name; found {len(weights)} weights {weights} for {names}.")
    needs = {"grounding": ("grounding", grounding), "linking": ("grounding", grounding), "stance": ("stance_checker", stance_checker)}
    for name in names:
        if name in needs and needs[name][1] is None:
            what = ("a judge.Grounding of the item table (Grounding(items, common_english_words(...)))" if needs[name][0] == "grounding"
                    else "a judge.StanceChecker fitted on reference reasons (StanceChecker.fit(references))")
            raise ValueError(f"rewards: {name!r} needs {needs[name][0]}: {what}.")
    makers = {
        "verdict_correct": lambda: VerdictCorrect(answer_format),
        "verdict_brier": lambda: VerdictProbability(answer_format, "brier", p_yes_column),
        "verdict_log_likelihood": lambda: VerdictProbability(answer_format, "log_likelihood", p_yes_column),
        "format": lambda: FormatReward(answer_format, max_words=max_words, max_repeated_rate=max_repeated_rate),
        "grounding": lambda: GroundingReward(grounding, answer_format, no_mentions=no_mentions),
        "linking": lambda: LinkingReward(grounding, answer_format, common_words=common_words),
        "stance": lambda: StanceReward(stance_checker, answer_format),
    }
    return [checked(makers[name]()) for name in names], weights
