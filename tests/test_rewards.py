"""GRPO rewards (thinkrec/reasons/rewards.py): exact values on hand-written completions for both answer
formats, the `checked` wrapper's errors, and a call through trl 1.16's own `GRPOTrainer._calculate_rewards`."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pandas as pd
import pytest

from thinkrec.reasons import rewards
from thinkrec.reasons.judge import Grounding, StanceChecker
from thinkrec.utils.errors import InputError


ITEMS = pd.DataFrame({
    "ItemID": [1, 2, 3, 4, 5],
    "title": ["Heat (1995)", "Fargo (1996)", "Big (1988)", "Shawshank Redemption, The (1994)", "Jaws (1975)"],
    "genres": ["Action|Crime", "Crime|Drama", "Comedy", "Drama", "Thriller"],
    "keywords": [["heist", "los angeles"], ["kidnapping", "snow", "heist"], ["toys"], ["prison", "friendship"], ["shark"]],
})
# Target Heat; history Fargo (shares the keyword "heist") and The Shawshank Redemption.
ROW = {"UserID": 7, "TargetItemID": 1, "HisItemIDs": [2, 4], "label": 1}


def columns(count, **overrides):
    """The dataset columns trl passes for `count` completions of ROW."""
    return {key: [overrides.get(key, value)] * count for key, value in ROW.items()}


@pytest.fixture(scope="module")
def grounding():
    return Grounding(ITEMS)


# ------------------------------------------------------------------------------------------ parsing


def test_completions_are_read_as_strings_or_assistant_messages_in_both_formats():
    assert rewards.completion_text("Yes. Fine.") == "Yes. Fine."
    assert rewards.completion_text([{"role": "assistant", "content": "No. Dull."}]) == "No. Dull."
    assert rewards.completion_text([{"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]) == "Yes."
    assert rewards.split_answer("Yes. It fits.", "answer_first") == (1, "It fits.")
    assert rewards.split_answer("It fits.\nAnswer: No.", "think_first") == (0, "It fits.")
    assert rewards.split_answer("It fits.\n  answer:yes  \n", "think_first") == (1, "It fits.")
    # think_first wants the verdict last, alone on its line.
    assert rewards.split_answer("Answer: Yes. It fits.", "think_first") == (None, "Answer: Yes. It fits.")
    assert rewards.split_answer("Yes. It fits.", "think_first") == (None, "Yes. It fits.")
    with pytest.raises(ValueError, match="answer_format must be one of"):
        rewards.split_answer("Yes.", "verdict_last")


# ------------------------------------------------------------------------------------------ verdicts


def test_verdict_correct_compares_the_formats_verdict_with_the_label():
    think = rewards.VerdictCorrect("think_first")
    texts = ["A heist like Fargo.\nAnswer: Yes.", "Nothing alike.\nAnswer: No.", "Yes. No final verdict line."]
    assert think(completions=texts, label=[1, 1, 1]) == [1.0, 0.0, 0.0]
    assert think(completions=texts, label=[0, 0, 0]) == [0.0, 1.0, 0.0]
    first = rewards.VerdictCorrect("answer_first")
    assert first(completions=["Yes. It fits.", "No. It does not.", "Maybe."], label=[1, 1, 0]) == [1.0, 0.0, 0.0]
    assert first(completions=[[{"role": "assistant", "content": "No. Dull."}]], label=[0]) == [1.0]
    with pytest.raises(InputError, match=r"row 1 \(UserID 7, TargetItemID 1\): label should be 0 or 1; found 2"):
        first(completions=["Yes.", "Yes."], label=[1, 2], UserID=[7, 7], TargetItemID=[1, 1])
    with pytest.raises(InputError, match=r"needs the dataset column\(s\) \['label'\]; 'label' is missing"):
        first(completions=["Yes."], UserID=[7])


def test_verdict_probability_is_one_minus_brier_or_the_log_likelihood_of_the_label():
    texts = ["x\nAnswer: Yes."] * 4
    data = {"label": [1, 0, 1, 1], "verdict_p_yes": [0.8, 0.8, None, 1.0]}
    brier = rewards.VerdictProbability("think_first", "brier")
    assert brier.__name__ == "verdict_brier"
    assert brier(completions=texts, **data) == pytest.approx([0.96, 0.36, 0.0, 1.0], abs=1e-12)
    likelihood = rewards.VerdictProbability("think_first", "log_likelihood", min_probability=1e-4)
    assert likelihood.__name__ == "verdict_log_likelihood"
    # No verdict position (None) gets the floor, never None: trl's nansum would make None a perfect 0.
    assert likelihood(completions=texts, **data) == pytest.approx([math.log(0.8), math.log(0.2), math.log(1e-4), 0.0], abs=1e-12)
    with pytest.raises(InputError, match=r"row 0: verdict_p_yes should be a probability in \[0, 1\] or None; found 1.5"):
        brier(completions=texts[:1], label=[1], verdict_p_yes=[1.5])
    with pytest.raises(InputError, match="'verdict_p_yes' is missing"):
        brier(completions=texts[:1], label=[1])


# ------------------------------------------------------------------------------------------ format


def test_format_answer_first_checks_verdict_body_length_and_loops_and_logs_failures():
    reward = rewards.FormatReward("answer_first", max_words=12, max_repeated_rate=0.1)
    texts = [
        "Yes. The user liked Fargo and this heist film fits.",    # passes (10 words)
        "The user liked Fargo.",                                   # no leading verdict
        "Yes.",                                                    # empty body
        "Yes. " + " ".join(f"word{i}" for i in range(20)),         # 21 words > 12
        "Yes. great film great film great film great film",       # 3-gram loop: rate 4/6
    ]
    logged = {}
    assert reward(completions=texts, log_metric=lambda name, value: logged.__setitem__(name, value)) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert logged == {f"format/{check}": 0.2 for check in rewards.FormatReward.CHECKS}


def test_format_think_first_wants_reasoning_then_the_final_verdict_line():
    reward = rewards.FormatReward("think_first", max_words=12)
    texts = [
        "The user liked Fargo, another heist film.\nAnswer: Yes.",
        "Yes. The user liked Fargo.",                # the answer_first form has no final verdict line
        "Answer: Yes.",                              # no reasoning
        "Answer: Yes. The user liked Fargo.",        # the verdict is not last
    ]
    assert reward(completions=texts) == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="max_words >= 1"):
        rewards.FormatReward("think_first", max_words=0)


# ------------------------------------------------------------------------------------------ grounding, linking


def test_grounding_is_the_grounded_share_of_names_in_the_body(grounding):
    reward = rewards.GroundingReward(grounding, "answer_first")
    texts = [
        'Yes. Like "Fargo", it is a crime story about a heist.',  # fargo, crime, heist: all the row's own
        'Yes. Like "Jaws", it is a comedy about a shark.',        # none of the row's items
        'Yes. Like "Fargo" and "Jaws".',                          # one of two
        "Yes. A good fit.",                                       # names nothing
    ]
    assert reward(completions=texts, **columns(4)) == [1.0, 0.0, 0.5, 0.0]
    assert rewards.GroundingReward(grounding, "answer_first", no_mentions=None)(completions=texts[3:], **columns(1)) == [None]
    think = rewards.GroundingReward(grounding, "think_first")
    assert think(completions=['The user liked "Fargo", a crime story.\nAnswer: Yes.', 'A "Jaws" fan.\nAnswer: No.'],
                 **columns(2)) == [1.0, 0.0]
    with pytest.raises(InputError, match=r"\['TargetItemID', 'HisItemIDs'\]; 'HisItemIDs' is missing"):
        reward(completions=texts[:1], TargetItemID=[1])


def test_linking_needs_a_history_item_or_a_keyword_the_target_shares_with_one(grounding):
    reward = rewards.LinkingReward(grounding, "answer_first", common_words={"big"})
    texts = [
        "Yes. The user loved The Shawshank Redemption, and this one is as tense.",  # unquoted, ", The" dropped
        'Yes. Just like "Fargo".',                                                 # quoted history title
        "Yes. Another heist film.",                                                # keyword of Heat and Fargo
        "Yes. Snow everywhere, as in other films.",                                # Fargo's keyword, not Heat's
        'Yes. "Heat" is a great crime film.',                                      # the target itself; a genre
        'Yes. Like "Jaws".',                                                       # not in the history
    ]
    assert reward(completions=texts, **columns(6)) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # A one-word title that is an ordinary word counts only quoted.
    big = {"UserID": [7, 7], "TargetItemID": [1, 1], "HisItemIDs": [[3], [3]]}
    assert reward(completions=["Yes. A big film.", 'Yes. Like "Big".'], **big) == [0.0, 1.0]
    think = rewards.LinkingReward(grounding, "think_first")
    assert think(completions=["Another heist, as in Fargo (1996).\nAnswer: Yes.", "A fine film.\nAnswer: Yes."],
                 **columns(2)) == [1.0, 0.0]


# ------------------------------------------------------------------------------------------ stance

POSITIVE = ["The user loves {0} and this is exactly that kind of story, a perfect fit.",
            "It matches the {0} the user rated highly, so they will enjoy it.",
            "Everything the user liked points to {0}, and this one delivers it well."]
NEGATIVE = ["The user dislikes {0} and has rejected several titles like this one.",
            "Nothing the user enjoyed is about {0}; this is a poor fit for them.",
            "The user rated {0} badly, so this is unlikely to please them."]
TOPICS = ["westerns", "space operas", "heist thrillers", "family comedies", "war dramas", "musicals", "horror films", "courtroom dramas"]
FOR = "The user loves sports films and this is exactly that kind of story, a perfect fit."
AGAINST = "The user dislikes sports films and rejected titles like this."


@pytest.fixture(scope="module")
def checker():
    references = [f"Yes. {body.format(t)}" for body in POSITIVE for t in TOPICS]
    return StanceChecker.fit(references + [f"No. {body.format(t)}" for body in NEGATIVE for t in TOPICS])


def test_stance_rewards_a_body_that_argues_for_its_verdict(checker):
    first = rewards.stance_reward(checker, "answer_first")
    assert first.__name__ == "stance"
    assert first(completions=[f"Yes. {FOR}", f"No. {FOR}", f"No. {AGAINST}", "Yes.", f"Maybe. {FOR}"]) == [1.0, 0.0, 1.0, 0.0, 0.0]
    think = rewards.stance_reward(checker, "think_first")
    assert think(completions=[f"{FOR}\nAnswer: Yes.", f"{FOR}\nAnswer: No.", f"{AGAINST}\nAnswer: No.", FOR]) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(TypeError, match="fitted judge.StanceChecker"):
        rewards.stance_reward(object(), "answer_first")


# ------------------------------------------------------------------------------------------ checked, build


def test_checked_names_the_row_that_raises():
    def fragile(completions, **kwargs):
        return [1.0 / (text != "boom") for text in completions]

    reward = rewards.checked(fragile)
    assert reward.__name__ == "fragile" and reward(completions=["fine"]) == [1.0]
    ids = {"UserID": [7, 8, 9], "TargetItemID": [20, 21, 22]}
    with pytest.raises(InputError, match=r"reward 'fragile' failed on row 1 \(UserID 8, TargetItemID 21\), completion 'boom': ZeroDivisionError"):
        reward(completions=["fine", "boom", "fine"], **ids)
    # A bad value in one row of a library reward: found by re-running row by row.
    linking = rewards.checked(rewards.LinkingReward(Grounding(ITEMS), "answer_first"))
    with pytest.raises(InputError, match=r"reward 'linking' failed on row 1 \(UserID 8, TargetItemID x\)"):
        linking(completions=["Yes.", "Yes."], UserID=[7, 8], TargetItemID=[1, "x"], HisItemIDs=[[2], [2]])
    with pytest.raises(InputError, match=r"reward 'linking': row 0 \(UserID 7, TargetItemID 1\): HisItemIDs should be a list"):
        linking(completions=["Yes."], UserID=[7], TargetItemID=[1], HisItemIDs=[None])


def test_checked_refuses_nan_and_a_wrong_length_and_keeps_none():
    def nan_reward(completions, **kwargs):
        return [float("nan"), 1.0]

    def short_reward(completions, **kwargs):
        return [1.0]

    def partial_reward(completions, **kwargs):
        return [None, 1]

    with pytest.raises(ValueError, match=r"reward 'nan_reward' returned nan for row 0 \(UserID 7\); rewards must be finite"):
        rewards.checked(nan_reward)(completions=["a", "b"], UserID=[7, 8])
    with pytest.raises(ValueError, match="reward 'short_reward' returned 1 rewards for 2 completions"):
        rewards.checked(short_reward)(completions=["a", "b"])
    assert rewards.checked(partial_reward)(completions=["a", "b"]) == [None, 1.0]


def test_build_rewards_returns_checked_functions_and_their_weights(grounding, checker):
    funcs, weights = rewards.build_rewards(["verdict_correct", "format", "grounding", "linking", "stance"], [1.0, 0.2, 0.1, 0.1, 0.1],
                                          answer_format="answer_first", grounding=grounding, stance_checker=checker)
    assert [f.__name__ for f in funcs] == ["verdict_correct", "format", "grounding", "linking", "stance"]
    assert weights == [1.0, 0.2, 0.1, 0.1, 0.1] and all(isinstance(f.__wrapped__, rewards.Reward) for f in funcs)
    assert rewards.build_rewards(["format"], answer_format="answer_first")[1] == [1.0]
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['fluency'\]"):
        rewards.build_rewards(["fluency"], answer_format="answer_first")
    with pytest.raises(ValueError, match="'linking' needs grounding"):
        rewards.build_rewards(["linking"], answer_format="answer_first")
    with pytest.raises(ValueError, match="'stance' needs stance_checker"):
        rewards.build_rewards(["stance"], answer_format="answer_first", grounding=grounding)
    with pytest.raises(ValueError, match="one finite weight per name; found 1 weights"):
        rewards.build_rewards(["format", "verdict_correct"], [1.0], answer_format="answer_first")


# ------------------------------------------------------------------------------------------ trl


def test_trl_calls_the_rewards_through_its_own_calculate_rewards(grounding, checker):
    """trl 1.16.0 grpo_trainer.py `_calculate_rewards` (line ~1579) builds `reward_kwargs` from every input
    column but prompt / completion / completion_ids, adds trainer_state, log_extra, log_metric, and calls
    `reward_func(prompts=..., completions=..., completion_ids=..., **reward_kwargs)` (line ~1626); names come
    from `get_callable_name` (line ~564) and are logged as rewards/<name>/mean (line ~2823). Here that method
    runs on a bare trainer object holding only the attributes it reads."""
    trl = pytest.importorskip("trl")
    import torch
    from transformers import TrainerState
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import get_callable_name

    assert trl.__version__ == "1.16.0", "the private method this test calls is read from trl 1.16.0; check it again"
    names = ["verdict_correct", "verdict_brier", "format", "grounding", "linking", "stance"]
    funcs, weights = rewards.build_rewards(names, [1.0, 1.0, 0.2, 0.1, 0.1, 0.1], answer_format="think_first", grounding=grounding,
                                           stance_checker=checker, max_words=40)
    completions = [f'Like "Fargo", a heist. {FOR}\nAnswer: Yes.', f"{AGAINST}\nAnswer: No."]  # one row, two generations
    prompt = "#Question: ... #Answer:"
    # trl's inputs: raw dataset rows repeated num_generations times, plus a per-completion extra field.
    inputs = [dict(ROW, prompt=prompt, verdict_p_yes=p) for p in (0.9, 0.4)]
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=True)
    trainer.args, trainer.state, trainer.environments = SimpleNamespace(report_to=[]), TrainerState(), None
    trainer.reward_funcs, trainer.reward_processing_classes = funcs, [None] * len(funcs)
    trainer.reward_func_names = [get_callable_name(f) for f in funcs]
    trainer._pending_metrics, trainer._pending_extra_logs = defaultdict(list), defaultdict(list)
    per_func = trainer._calculate_rewards(inputs, [prompt] * 2, completions, [[1, 2, 3], [4, 5]])
    assert trainer.reward_func_names == names
    expected = [[1.0, 1 - 0.1 ** 2, 1.0, 1.0, 1.0, 1.0],   # right, grounded, linked (Fargo), argues Yes
                [0.0, 1 - 0.6 ** 2, 1.0, 0.0, 0.0, 1.0]]   # wrong verdict for label 1, names nothing, argues No
    torch.testing.assert_close(per_func, torch.tensor(expected))
    assert set(trainer._pending_metrics) == {f"format/{check}" for check in rewards.FormatReward.CHECKS}
