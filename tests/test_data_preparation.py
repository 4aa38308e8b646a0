"""Labels, splits, histories, negatives, cold flags and candidate pools."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from thinkrec.data.preparation import RecordOptions, build_histories, gather_ragged, prepare_records, records_from_collm
from thinkrec.data.readers import DataFormatError, InteractionLog, read_collm_splits
from thinkrec.utils.errors import InputError


BENCHMARK_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml1m-collm"


def make_log(rows, titles=None, feedback="rating"):
    """rows: (user, item, timestamp, rating-or-label)."""
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp", "value"])
    interactions = frame[["user", "item", "timestamp"]].astype({"user": str, "item": str, "timestamp": "int64"})
    if feedback == "rating":
        interactions["rating"] = frame["value"].astype(float)
    elif feedback == "label":
        interactions["label"] = frame["value"].astype("int64")
    items = sorted(set(interactions["item"]))
    titles = titles or {i: f"Movie {i}" for i in items}
    item_table = pd.DataFrame({"item": list(titles), "title": list(titles.values()), "genres": "", "description": ""})
    return InteractionLog(interactions=interactions, items=item_table, source="toy")


def rows_of(table):
    return table.to_pandas().to_dict("records")


def test_gather_ragged():
    values, offsets = gather_ragged(np.array([10, 11, 12, 13]), np.array([1, 0, 3]), np.array([2, 0, 1]))
    assert values.tolist() == [11, 12, 13]
    assert offsets.tolist() == [0, 2, 2, 3]


def test_build_histories_positive_only_truncated_and_per_user():
    users = np.array([1, 1, 1, 1, 2, 2])
    items = np.array([5, 6, 7, 8, 5, 9])
    labels = np.array([1, 0, 1, 1, 1, 1])
    hist_items, hist_labels, offsets = build_histories(users, items, labels, labels == 1, max_history=1)
    histories = [hist_items[offsets[i] : offsets[i + 1]].tolist() for i in range(6)]
    assert histories == [[], [5], [5], [7], [], [5]]


def test_ratings_are_binarised_and_temporal_split_respects_cut_times():
    log = make_log(
        [
            ("a", "1", 10, 5), ("a", "2", 20, 1), ("b", "1", 15, 4), ("b", "3", 30, 3),
            ("a", "3", 40, 4), ("b", "2", 50, 5), ("c", "2", 60, 2),
        ]
    )
    records = prepare_records(log, RecordOptions(split_timestamps=[25, 45]))
    train, valid, test = (rows_of(records.splits[s]) for s in ("train", "validation", "test"))
    assert [r["timestamp"] for r in train] == [10, 15, 20]
    assert [r["timestamp"] for r in valid] == [30, 40]
    assert [r["timestamp"] for r in test] == [50, 60]
    # rating > 3 is positive: 5,4,1 | 3,4 | 5,2
    assert [r["label"] for r in train + valid + test] == [1, 1, 0, 0, 1, 1, 0]
    # Dense ids: users a,b,c -> 1,2,3; items 1,2,3 -> 1,2,3 (numeric order kept).
    assert [r["UserID"] for r in test] == [2, 3]
    assert records.metadata["num_users"] == 4 and records.metadata["num_items"] == 4
    # Histories cross splits in time order (the published protocol): b liked item 1 in train.
    assert test[0]["HisItemIDs"].tolist() == [1]
    assert test[0]["HisItemTitles"].tolist() == ["Movie 1"]
    assert all(r["mode"] == "rec" and r["reason"] == "" for r in train + valid + test)


def test_history_modes_and_truncation():
    log = make_log([("a", str(i), 10 * i, 5 if i % 2 else 1) for i in range(1, 8)] + [("b", "1", 1, 5)])
    positives = prepare_records(log, RecordOptions(max_history=2, split_ratios=[0.5, 0.25, 0.25]))
    every = prepare_records(log, RecordOptions(max_history=2, history_mode="all", split_ratios=[0.5, 0.25, 0.25]))
    last = lambda records: rows_of(records.splits["test"])[-1]  # noqa: E731 - user a, item 7
    assert last(positives)["TargetItemID"] == 7
    assert last(positives)["HisItemIDs"].tolist() == [3, 5]
    assert last(positives)["HisItemLabels"].tolist() == [1, 1]
    assert last(every)["HisItemIDs"].tolist() == [5, 6]
    assert last(every)["HisItemLabels"].tolist() == [1, 0]


def test_not_cold_uses_train_counts():
    # One low rating: a rating column must hold positives and negatives (not_cold does not depend on it).
    log = make_log([("a", "1", 1, 5), ("a", "2", 2, 5), ("b", "1", 3, 5), ("c", "1", 4, 1), ("a", "3", 5, 5), ("a", "1", 6, 5)])
    records = prepare_records(log, RecordOptions(split_timestamps=[3, 4], duplicates="drop"))
    flags = {(r["UserID"], r["TargetItemID"]): r["not_cold"] for s in records.splits.values() for r in rows_of(s)}
    # train = rows at t=1,2 (user a; items 1,2). b and c are cold users, item 3 is a cold item.
    assert flags[(2, 1)] == 0 and flags[(3, 1)] == 0
    assert flags[(1, 3)] == 0
    assert flags[(1, 1)] == 1
    stricter = prepare_records(log, RecordOptions(split_timestamps=[3, 4], min_count=2))
    assert all(r["not_cold"] == 0 for r in rows_of(stricter.splits["test"]))


def test_not_cold_counts_observed_train_rows_not_sampled_negatives():
    # Items A, B, C, D; u1 saw A, B and D, so each of its train negatives is C, which nobody saw in train.
    rows = [(f"u{u}", item, t, 0) for u in range(10) for item, t in (("A", u + 1), ("B", u + 20))]
    rows += [("u0", "C", 100, 0), ("u1", "D", 60, 0)]
    records = prepare_records(make_log(rows, feedback="implicit"), RecordOptions(split_timestamps=[50, 90], seed=0))
    items = records.items.set_index("original_id")["ItemID"]
    train = records.splits["train"].to_pandas()
    assert (train.loc[train.label == 0, "TargetItemID"] == items["C"]).any(), "the fixture must draw C as a train negative"
    test = records.splits["test"].to_pandas()
    observed_c = test[(test.label == 1) & (test.TargetItemID == items["C"])]
    assert observed_c["not_cold"].tolist() == [0], "C never occurs as an observed train row"
    assert (train.loc[train.label == 1, "not_cold"] == 1).all()


def test_popularity_negatives_count_train_rows_only():
    # "future" is the most observed item, but only in the test period: train must not know it.
    rows = [(f"u{u}", f"old{(u + step) % 10}", 10 * step + u, 0) for u in range(40) for step in range(3)]
    rows += [(f"u{u}", "future", 1000 + u, 0) for u in range(40)]
    rows += [(f"v{u}", f"old{(u + step) % 10}", 10 * step + u, 0) for u in range(20) for step in range(3)]
    rows += [(f"v{u}", f"old{(u + 5) % 10}", 1000 + u, 0) for u in range(20)]
    log = make_log(rows, feedback="implicit")
    records = prepare_records(log, RecordOptions(negative_sampling="popularity", split_timestamps=[20, 900], seed=1))
    future = records.items.set_index("original_id").loc["future", "ItemID"]
    negatives = pd.concat([s.to_pandas() for s in records.splits.values()]).query("label == 0")
    assert len(negatives) == 240
    assert (negatives["TargetItemID"] != future).all()


def test_the_item_noun_is_a_preparation_setting_stored_in_the_metadata(tmp_path):
    log = make_log([("a", "1", 1, 5), ("b", "2", 2, 1), ("c", "1", 3, 5)])
    default = prepare_records(log, RecordOptions(split_timestamps=[2, 3]))
    assert (default.metadata["item_noun"], default.metadata["item_noun_plural"]) == ("movie", "movies")
    games = prepare_records(log, RecordOptions(split_timestamps=[2, 3], item_noun="game", item_noun_plural="games"))
    assert (games.metadata["item_noun"], games.metadata["item_noun_plural"]) == ("game", "games")
    with pytest.raises(InputError, match="set item_noun and item_noun_plural together"):
        RecordOptions(item_noun="game")
    with pytest.raises(InputError, match="item_noun_plural must be a word"):
        RecordOptions(item_noun="game", item_noun_plural=" ")


def test_a_table_source_must_say_what_its_items_are(tmp_path):
    import prepare_data

    table = tmp_path / "plays.csv"
    plays = [(f"u{u}", (u + g) % 8, 10 * g + u) for u in range(8) for g in range(3)]
    table.write_text("user_id,item_id,timestamp,name\n" + "".join(f"{u},g{g},{t},Game {g}\n" for u, g, t in plays))
    arguments = ["--source", "table", "--data_path", str(table), "--title_column", "name", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(InputError, match=r"source='table' .*plays.csv.*set item_noun and item_noun_plural"):
        prepare_data.main(arguments)
    directory = prepare_data.main(arguments + ["--item_noun", "game", "--item_noun_plural", "games"])
    metadata = json.loads((directory / "metadata.json").read_text())
    assert (metadata["item_noun"], metadata["item_noun_plural"]) == ("game", "games")
    assert '"game" / "games"' in (directory / "README.md").read_text()


def test_leave_one_out_and_short_users_are_reported():
    log = make_log([("a", str(i), i, 5) for i in range(1, 6)] + [("b", "1", 1, 5), ("b", "2", 2, 5), ("c", "1", 1, 5), ("c", "2", 2, 1), ("c", "3", 3, 5)])
    records = prepare_records(log, RecordOptions(split_mode="leave_one_out"))
    test = rows_of(records.splits["test"])
    valid = rows_of(records.splits["validation"])
    assert sorted((r["UserID"], r["TargetItemID"]) for r in test) == [(1, 5), (3, 3)]
    assert sorted((r["UserID"], r["TargetItemID"]) for r in valid) == [(1, 4), (3, 2)]
    assert records.metadata["report"]["leave_one_out_users_dropped"] == 1
    assert all(r["UserID"] != 2 for s in records.splits.values() for r in rows_of(s))


def test_implicit_logs_get_unseen_negatives_that_share_the_positive_history():
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"p{i}", int(t), 0) for u in range(20) for t, i in enumerate(rng.choice(30, size=8, replace=False))]
    log = make_log(rows, feedback="implicit")
    records = prepare_records(log, RecordOptions(negatives_per_positive=2, split_ratios=[0.6, 0.2, 0.2], seed=3))
    frame = pd.concat([s.to_pandas() for s in records.splits.values()])
    assert (frame["label"] == 1).sum() == 160 and (frame["label"] == 0).sum() == 320
    seen = set(zip(frame.loc[frame.label == 1, "UserID"], frame.loc[frame.label == 1, "TargetItemID"]))
    negatives = frame[frame.label == 0]
    assert not any((u, i) in seen for u, i in zip(negatives["UserID"], negatives["TargetItemID"]))
    # A negative's history is its positive's: never the positive itself, same length.
    positives = frame[frame.label == 1].set_index(["UserID", "timestamp"])
    for _, negative in negatives.head(40).iterrows():
        positive = positives.loc[(negative["UserID"], negative["timestamp"])]
        assert negative["HisItemIDs"].tolist() == positive["HisItemIDs"].tolist()
    again = prepare_records(log, RecordOptions(negatives_per_positive=2, split_ratios=[0.6, 0.2, 0.2], seed=3))
    assert again.splits["test"].equals(records.splits["test"])


def test_popularity_negatives_follow_item_counts():
    rows = [(f"u{u}", "hit" if t % 2 == 0 else f"rare{u}_{t}", 10 * u + t, 0) for u in range(60) for t in range(2)]
    rows += [(f"v{u}", f"rare_v{u}", 10 * u + 5, 0) for u in range(60)]
    log = make_log(rows, feedback="implicit")
    records = prepare_records(log, RecordOptions(negative_sampling="popularity", split_ratios=[0.8, 0.1, 0.1]))
    frame = pd.concat([s.to_pandas() for s in records.splits.values()])
    hit = records.items.set_index("original_id").loc["hit", "ItemID"]
    negatives = frame[frame.label == 0]
    # "hit" holds 60 of 180 observed interactions; only users v* may receive it as a negative.
    v_users = set(records.users.loc[records.users.original_id.str.startswith("v"), "UserID"])
    share = (negatives.loc[negatives.UserID.isin(v_users), "TargetItemID"] == hit).mean()
    assert share > 0.2


def test_candidate_pools_hold_the_positive_first_and_distinct_unseen_negatives():
    rows = [(f"u{u}", f"i{(u * 7 + t) % 50}", t, 5 if (u + t) % 3 else 1) for u in range(30) for t in range(6)]
    records = prepare_records(make_log(rows), RecordOptions(num_candidates=20, split_ratios=[0.5, 0.2, 0.3]))
    pools = records.candidates.to_pandas()
    assert len(pools) == (records.splits["test"].to_pandas()["label"] == 1).sum()
    all_rows = pd.concat([s.to_pandas() for s in records.splits.values()])
    seen = set(zip(all_rows.UserID, all_rows.TargetItemID))
    for _, pool in pools.iterrows():
        candidates = pool["CandidateItemIDs"].tolist()
        assert candidates[0] == pool["TargetItemID"] and len(candidates) == 21
        assert len(set(candidates)) == 21
        assert not any((pool["UserID"], c) in seen for c in candidates[1:])


def test_duplicates_are_an_error_or_dropped_and_counted():
    log = make_log([("a", "1", 1, 5), ("a", "1", 1, 4), ("b", "2", 2, 1), ("c", "1", 3, 5)])
    with pytest.raises(DataFormatError, match=r"1 duplicate.*user='a' item='1' timestamp=1"):
        prepare_records(log, RecordOptions(split_timestamps=[2, 3]))
    records = prepare_records(log, RecordOptions(split_timestamps=[2, 3], duplicates="drop"))
    assert records.metadata["report"]["duplicate_rows_dropped"] == 1


def test_items_without_titles():
    log = make_log([("a", "1", 1, 5), ("b", "2", 2, 5), ("c", "1", 3, 1), ("c", "2", 4, 5)], titles={"1": "One", "2": ""})
    with pytest.raises(DataFormatError, match=r"1 item\(s\) have no title.*\['2'\]"):
        prepare_records(log, RecordOptions(split_timestamps=[2, 3]))
    named = prepare_records(log, RecordOptions(split_timestamps=[2, 3], missing_titles="use_id"))
    assert "Item 2" in named.items["title"].tolist()
    with pytest.raises(DataFormatError, match="validation split is empty"):
        prepare_records(log, RecordOptions(split_timestamps=[2, 3], missing_titles="drop"))


def test_item_ids_missing_from_the_item_file_are_reported_before_titles(caplog):
    """Ids of the interactions that the item file lacks are a failed join ('12.0' against '12'): an error by
    default, and with missing_titles 'use_id' or 'drop' (items without metadata accepted) a count in the log."""
    rows = [("a", "12.0", 1, 5), ("b", "13", 2, 1), ("c", "12.0", 3, 5), ("c", "13", 4, 5), ("d", "14", 5, 1)]
    titles = {"12": "Twelve", "13": "Thirteen", "14": "Fourteen"}
    log = make_log(rows, titles=titles)
    log.path, log.item_path = "ratings.csv", "items.jsonl"
    with pytest.raises(InputError, match=r"^1 of 3 item ids of ratings.csv are not in items.jsonl \(e.g. '12.0'; the item "
                                         r"file has e.g. '12'\)"):
        prepare_records(log, RecordOptions(split_timestamps=[3, 5]))
    with caplog.at_level("WARNING", logger="thinkrec.data.preparation"):
        named = prepare_records(log, RecordOptions(split_timestamps=[3, 5], missing_titles="use_id"))
    assert "1 of 3 item ids of ratings.csv are not in items.jsonl" in caplog.text
    assert named.metadata["report"]["items_not_in_item_file"] == 1
    assert "Item 12.0" in named.items["title"].tolist()
    # Not one id found: the files do not share their ids, whatever missing_titles says.
    log.items = pd.DataFrame({"item": ["x", "y"], "title": ["X", "Y"], "genres": "", "description": ""})
    for policy in ("use_id", "drop"):
        with pytest.raises(InputError, match=r"3 of 3 item ids of ratings.csv are not in items.jsonl .*none of them"):
            prepare_records(log, RecordOptions(split_timestamps=[3, 5], missing_titles=policy))
    # Without an item file the items come from the interaction file itself: nothing to join.
    log.item_path = None
    assert len(prepare_records(log, RecordOptions(split_timestamps=[3, 5], missing_titles="use_id")).items) == 3


def test_empty_split_after_filtering_is_an_error():
    log = make_log([("a", "1", 1, 5), ("a", "2", 2, 1)])
    with pytest.raises(DataFormatError, match="test split is empty"):
        prepare_records(log, RecordOptions(split_timestamps=[2, 100]))


def test_min_count_filter_reports_removals():
    log = make_log([("a", "1", 1, 5), ("a", "2", 2, 1), ("a", "3", 3, 5), ("b", "1", 4, 5), ("c", "1", 5, 5), ("c", "2", 6, 1)])
    records = prepare_records(log, RecordOptions(min_user_interactions=2, split_timestamps=[3, 6]))
    assert records.metadata["report"]["min_count_filter"] == {"rows_removed": 1, "users_removed": 1, "items_removed": 0}


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="split_ratios"):
        RecordOptions(split_ratios=[0.5, 0.5])
    with pytest.raises(ValueError, match="history_mode"):
        RecordOptions(history_mode="everything")


@pytest.mark.needs_benchmark_data
@pytest.mark.skipif(not BENCHMARK_DATA.is_dir(), reason=f"benchmark split not present at {BENCHMARK_DATA}")
def test_ml1m_collm_round_trip_keeps_rows_ids_and_histories():
    presplit = read_collm_splits(BENCHMARK_DATA)
    records = records_from_collm(presplit, max_history=10)
    assert records.metadata["rows"] == {"train": 33_891, "validation": 10_401, "test": 7_331}
    assert records.metadata["num_users"] == 839 and records.metadata["num_items"] == 3256
    raw = presplit.splits["test"].iloc[0]
    row = records.splits["test"].slice(0, 1).to_pylist()[0]
    assert row["UserID"] == raw["uid"] and row["TargetItemID"] == raw["iid"]
    assert row["HisItemIDs"] == list(raw["his"][1:][-10:])
    assert row["HisItemTitles"] == list(raw["his_title"][1:][-10:])
    assert records.splits["train"]["not_cold"].to_numpy().all()


def test_collm_records_get_ranking_pools_of_unseen_listed_items():
    """num_candidates was ignored for the collm source (no pools, silently); pools now come from items
    the user has no row or history entry of, drawn only among items of the item table."""
    from thinkrec.data.readers import PresplitRecords

    def frame(flag, users, items, labels):
        return pd.DataFrame({"uid": users, "iid": items, "label": labels, "timestamp": list(range(len(users))),
                             "his": [[0, 2]] * len(users), "his_title": [["", "B"]] * len(users),
                             "title": [f"T{i}" for i in items], "flag": [flag] * len(users), "not_cold": [1] * len(users)})

    splits = {"train": frame(-1, [1, 1, 2], [3, 4, 3], [1, 0, 1]), "validation": frame(0, [1], [5], [1]),
              "test": frame(1, [1, 2, 2], [6, 7, 8], [1, 1, 0])}
    items = pd.DataFrame({"item": [i for i in range(1, 21) if i != 13], "title": [f"T{i}" for i in range(1, 21) if i != 13],
                          "genres": "", "description": ""})
    records = records_from_collm(PresplitRecords(splits=splits, items=items, source="collm:toy"), num_candidates=12, seed=1)
    pools = records.candidates.to_pylist()
    assert [(pool["UserID"], pool["TargetItemID"]) for pool in pools] == [(1, 6), (2, 7)]
    seen = {1: {2, 3, 4, 5, 6}, 2: {2, 3, 7, 8}}
    for pool in pools:
        candidates = pool["CandidateItemIDs"]
        assert candidates[0] == pool["TargetItemID"] and len(candidates) == 13 == len(set(candidates))
        assert not set(candidates[1:]) & seen[pool["UserID"]]
        assert 13 not in candidates  # not in the item table: no title to show
    again = records_from_collm(PresplitRecords(splits=splits, items=items, source="collm:toy"), num_candidates=12, seed=1)
    assert again.candidates.to_pylist() == pools
    assert records_from_collm(PresplitRecords(splits=splits, items=items, source="collm:toy")).candidates is None
