"""Seeded evaluation subsets keep whole users and fill their budget with as many users as fit."""

import numpy as np
import pandas as pd

from thinkrec.utils.subsets import seeded_subset, seeded_user_subset


def test_a_heavy_user_does_not_crowd_out_the_others():
    # One user with 50 rows and four with 3: a 10-row budget holds three of the small users, whatever
    # the seeded order (the heavy user used to be taken alone whenever it came first).
    frame = pd.DataFrame({"UserID": [1] * 50 + [2] * 3 + [3] * 3 + [4] * 3 + [5] * 3, "row": range(62)})
    for seed in range(20):
        subset = seeded_user_subset(frame, 10, seed)
        assert len(subset) == 9 and subset["UserID"].nunique() == 3 and 1 not in set(subset["UserID"]), seed
        for user in set(subset["UserID"]):  # whole users, in the split's order
            assert (subset["UserID"] == user).sum() == (frame["UserID"] == user).sum()
        assert subset["row"].is_monotonic_increasing


def test_when_no_user_fits_one_user_is_kept_and_no_budget_keeps_everything():
    frame = pd.DataFrame({"UserID": [1] * 5 + [2] * 6})
    assert seeded_user_subset(frame, 3, seed=0)["UserID"].nunique() == 1
    assert seeded_user_subset(frame, None, seed=0) is frame and seeded_subset(frame, 100, seed=0) is frame
    rows = seeded_subset(pd.DataFrame({"x": np.arange(100)}), 10, seed=1)["x"]
    assert len(rows) == 10 and rows.is_monotonic_increasing
