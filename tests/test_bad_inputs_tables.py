"""prepare_data on table and RecBole inputs: ids stay the strings written, a rating or label column that
cannot split positives from negatives is refused, unreadable files and bad split ratios are one line."""

import json
from collections import Counter

import pandas as pd
import pytest
from _bad_inputs import assert_inputs_unchanged, assert_one_line_error, file_hashes, leftovers, run_main

import prepare_data
from thinkrec.data.records import load_prepared


NOUNS = ["--item_noun", "item", "--item_noun_plural", "items"]
# Four steps of ten seconds: steps 0-1 are train, 2 validation, 3 test.
SPLIT = ["--split_timestamps", "20", "30"]


def rows(users, items, ratings=(5, 1)):
    """One row per (step, user): user k rates items[step] at time 10*step + k, ratings cycling."""
    return [(user, item, 10 * step + k, ratings[(step + k) % len(ratings)])
            for step, item in enumerate(items) for k, user in enumerate(users)]


def table(header, lines, sep=","):
    return sep.join(header) + "\n" + "".join(sep.join(map(str, line)) + "\n" for line in lines)


def ratings_csv(users, items, ratings=(5, 1), rating="rating", sep=","):
    return table(["user_id", "item_id", "timestamp", rating], rows(users, items, ratings), sep)


def jsonl(records):
    return "".join(json.dumps(record) + "\n" for record in records)


def titled(items):
    return [{"item_id": item, "name": f"Title of {item}"} for item in items]


def table_args(data, rating="rating", item_file=None, extra=()):
    args = ["--source", "table", "--data_path", "{input}/" + data, *NOUNS, *SPLIT, *extra]
    if rating:
        args += ["--rating_column", rating]
    if item_file:
        args += ["--item_path", "{input}/" + item_file, "--title_column", "name"]
    else:
        args += ["--missing_titles", "use_id"]
    return args


USERS_7 = ["7", "07", "007"]
ITEMS = ["i1", "i2", "i3", "i4"]
# Numbers only, so that a reader guessing types would see one number in the first two.
ISBNS = ["0439064872", "439064872", "0590353403", "1234567890"]
RECBOLE_HEADER = ["user_id:token", "item_id:token", "timestamp:float", "rating:float"]


def write_inputs(folder, files):
    folder.mkdir()
    for name, content in files.items():
        path = folder / name
        if isinstance(content, pd.DataFrame):
            content.to_parquet(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def run_case(tmp_path, capsys, files, args):
    inputs, output = tmp_path / "in", tmp_path / "out"
    write_inputs(inputs, files)
    before = file_hashes([inputs])
    argv = [arg.format(input=inputs) for arg in args] + ["--output_dir", str(output)]
    outcome = run_main(prepare_data.main, argv, capsys)
    assert_inputs_unchanged(before)
    assert leftovers(output) == []
    return outcome, output


REFUSED = [
    pytest.param({"ratings.csv": b""}, table_args("ratings.csv"), ("ratings.csv", "empty"), id="csv-0-bytes"),
    pytest.param({"ratings.csv": ratings_csv(USERS_7, ITEMS) + "u9,i1,99,5,extra\n"},
                 table_args("ratings.csv"), ("ratings.csv", "line 14", "4 fields"), id="csv-row-with-an-extra-field"),
    pytest.param({"ratings.csv": ratings_csv(USERS_7, ITEMS),
                  "items.csv": "item_id,name\ni1,One\ni2,Two,extra\ni3,Three\ni4,Four\n"},
                 table_args("ratings.csv", item_file="items.csv"), ("items.csv", "line 3", "2 fields"),
                 id="item-csv-row-with-an-extra-field"),
    pytest.param({"ratings.jsonl": jsonl([{"user_id": "u1", "item_id": "i1", "timestamp": 1, "rating": 5}]) + '{"user_id": \n'},
                 table_args("ratings.jsonl"), ("ratings.jsonl", "JSON lines"), id="jsonl-line-cut-short"),
    pytest.param({"ratings.csv": ratings_csv(USERS_7, ITEMS, ratings=(0, 1), rating="stars")},
                 table_args("ratings.csv", rating="stars"),
                 ("ratings.csv", "column 'stars'", "rating_threshold 3.0", "0..1", "all rows negative", "label_column"),
                 id="rating-0-1-against-threshold-3"),
    pytest.param({"ratings.csv": ratings_csv(USERS_7, ITEMS, ratings=(4,))}, table_args("ratings.csv"),
                 ("ratings.csv", "column 'rating'", "rating_threshold 3.0", "4", "all rows positive"),
                 id="rating-all-equal"),
    pytest.param({"ratings.csv": ratings_csv(USERS_7, ITEMS, ratings=(1, 2, 3))}, table_args("ratings.csv"),
                 ("ratings.csv", "column 'rating'", "rating_threshold 3.0", "1..3", "all rows negative"),
                 id="rating-all-at-or-below-threshold"),
    pytest.param({"plays.csv": ratings_csv(USERS_7, ITEMS, ratings=(1,), rating="liked")},
                 table_args("plays.csv", rating=None, extra=["--label_column", "liked"]),
                 ("plays.csv", "column 'liked'", "1", "all rows positive"), id="label-all-one"),
    pytest.param({"toy.inter": table(RECBOLE_HEADER, rows(USERS_7, ITEMS, ratings=(5,)), sep="\t")},
                 ["--source", "recbole", "--data_path", "{input}/toy.inter", *NOUNS, *SPLIT, "--missing_titles", "use_id"],
                 ("toy.inter", "column 'rating'", "5", "all rows positive"), id="recbole-rating-all-equal"),
    pytest.param({"toy.inter": table(RECBOLE_HEADER, [("", "i1", 1, 5)] + rows(USERS_7, ITEMS), sep="\t")},
                 ["--source", "recbole", "--data_path", "{input}/toy.inter", *NOUNS, *SPLIT, "--missing_titles", "use_id"],
                 ("toy.inter", "'user_id'", "empty id"), id="recbole-empty-user-id"),
    pytest.param({"ratings.csv": ratings_csv(USERS_7, ITEMS) + ",i1,99,5\n"}, table_args("ratings.csv"),
                 ("ratings.csv", "'user_id'", "empty id"), id="csv-empty-user-id"),
    # pandas' missing-value markers in an id or time cell are empty cells, not an id "NA" that merges every such row.
    pytest.param({"ratings.csv": ratings_csv(USERS_7, ITEMS) + "NA,i1,99,5\n"}, table_args("ratings.csv"),
                 ("ratings.csv", "'user_id'", "empty id", "'NA'", "row 12"), id="csv-user-id-NA"),
    pytest.param({"ratings.csv": ratings_csv(USERS_7, ITEMS) + "".join(f"{marker},i1,{99 + k},5\n" for k, marker in enumerate(
                      ["N/A", "NaN", "nan", "null", "NULL", "None", "<NA>", "#N/A"]))},
                 table_args("ratings.csv"), ("ratings.csv", "'user_id'", "8 empty id", "'N/A'", "row 12"),
                 id="csv-user-ids-missing-value-markers"),
    pytest.param({"ratings.tsv": ratings_csv(USERS_7, ITEMS, sep="\t") + "u9\tnull\t99\t5\n"}, table_args("ratings.tsv"),
                 ("ratings.tsv", "'item_id'", "empty id", "'null'", "row 12"), id="tsv-item-id-null"),
    pytest.param({"ratings.csv": ratings_csv(USERS_7, ITEMS) + "u9,i1,NaN,5\n"}, table_args("ratings.csv"),
                 ("ratings.csv", "'timestamp'", "empty timestamp", "'NaN'", "row 12"), id="csv-timestamp-NaN"),
    pytest.param({"ratings.csv": ratings_csv(USERS_7, ITEMS),
                  "items.csv": "item_id,name\ni1,One\n#N/A,Two\ni3,Three\ni4,Four\n"},
                 table_args("ratings.csv", item_file="items.csv"), ("items.csv", "'item_id'", "empty id", "'#N/A'", "row 1"),
                 id="item-csv-item-id-#N/A"),
    pytest.param({"toy.inter": table(RECBOLE_HEADER, rows(USERS_7, ITEMS) + [("None", "i1", 99, 5)], sep="\t")},
                 ["--source", "recbole", "--data_path", "{input}/toy.inter", *NOUNS, *SPLIT, "--missing_titles", "use_id"],
                 ("toy.inter", "'user_id'", "empty id", "'None'", "row 12"), id="recbole-user-id-None"),
    # Interaction ids missing from the item file are a join that failed ("12.0" against "12"), not untitled items.
    pytest.param({"ratings.csv": ratings_csv(["u1", "u2"], ["12.0", "13.0", "14", "15"]),
                  "items.csv": table(["item_id", "name"], [(item, f"Title of {item}") for item in ("12", "13", "14", "15")])},
                 table_args("ratings.csv", item_file="items.csv"),
                 ("2 of 4 item ids of", "ratings.csv", "are not in", "items.csv", "e.g. '12.0'", "the item file has e.g. '12'"),
                 id="item-ids-not-in-the-item-file"),
    # The data file does not exist: the ratio error comes first, before anything is read.
    pytest.param({}, table_args("absent.csv", extra=["--split_ratios", "0.8", "0.1", "0.2"]),
                 ("split_ratios", "[0.8, 0.1, 0.2]", "sum"), id="split-ratios-sum-above-1"),
    pytest.param({}, table_args("absent.csv", extra=["--split_ratios", "1.2", "-0.1", "-0.1"]),
                 ("split_ratios", "-0.1"), id="split-ratios-negative"),
    pytest.param({}, table_args("absent.csv", extra=["--split_ratios", "0.5", "0.5"]),
                 ("split_ratios", "three", "[0.5, 0.5]"), id="split-ratios-two-values"),
]


@pytest.mark.parametrize("files, args, needles", REFUSED)
def test_refused_inputs_stop_with_one_line_and_write_nothing(tmp_path, capsys, files, args, needles):
    """The file is refused with one 'error:' line naming it; no metadata.json, no leftovers."""
    outcome, output = run_case(tmp_path, capsys, files, args)
    assert_one_line_error(outcome, *needles)
    assert not (output / "metadata.json").exists()


def users_with_rows(expected):
    def check(records):
        users = records.users.set_index("UserID")["original_id"]
        frame = pd.concat(records.splits.values())
        assert Counter(users[frame["UserID"]]) == expected
    return check


def items_with_titles(expected, rows_each):
    def check(records):
        items = records.items.set_index("original_id")
        assert items["title"].to_dict() == expected
        frame = pd.concat(records.splits.values())
        by_id = records.items.set_index("ItemID")["original_id"]
        assert Counter(by_id[frame["TargetItemID"]]) == {item: rows_each for item in expected}
    return check


def both(*checks):
    def check(records):
        for one in checks:
            one(records)
    return check


def sampled_negatives(records):
    rates = records.metadata["positive_rate"]
    assert all(0 < rate < 1 for rate in rates.values()), rates
    assert records.metadata["report"]["sampled_negatives"] == 12


ISBN_TITLES = {item: f"Title of {item}" for item in ISBNS}

KEPT = [
    pytest.param({"ratings.csv": ratings_csv(USERS_7, ITEMS)}, table_args("ratings.csv"),
                 users_with_rows({"7": 4, "07": 4, "007": 4}), id="csv-users-7-07-007"),
    pytest.param({"ratings.csv": ratings_csv(["u1", "u2"], ISBNS), "items.jsonl": jsonl(titled(ISBNS))},
                 table_args("ratings.csv", item_file="items.jsonl"), items_with_titles(ISBN_TITLES, 2),
                 id="csv-isbn-items-jsonl-item-file"),
    pytest.param({"ratings.jsonl": jsonl({"user_id": u, "item_id": i, "timestamp": t, "rating": r}
                                         for u, i, t, r in rows(["u1", "u2"], ISBNS)),
                  "items.csv": table(["item_id", "name"], [(item, f"Title of {item}") for item in ISBNS])},
                 table_args("ratings.jsonl", item_file="items.csv"), items_with_titles(ISBN_TITLES, 2),
                 id="jsonl-isbn-items-csv-item-file"),
    pytest.param({"ratings.tsv": ratings_csv(USERS_7, ISBNS, sep="\t"),
                  "items.tsv": table(["item_id", "name"], [(item, f"Title of {item}") for item in ISBNS], sep="\t")},
                 table_args("ratings.tsv", item_file="items.tsv"),
                 both(users_with_rows({"7": 4, "07": 4, "007": 4}), items_with_titles(ISBN_TITLES, 3)),
                 id="tsv-users-and-isbn-items"),
    # Ids stored as numbers become their decimal text in both files, so they still join.
    pytest.param({"ratings.parquet": pd.DataFrame(rows([7, 8], [101, 102, 103, 104]), columns=["user_id", "item_id", "timestamp", "rating"]),
                  "items.jsonl": jsonl({"item_id": item, "name": f"Title of {item}"} for item in (101, 102, 103, 104))},
                 table_args("ratings.parquet", item_file="items.jsonl"),
                 both(users_with_rows({"7": 4, "8": 4}), items_with_titles({str(i): f"Title of {i}" for i in (101, 102, 103, 104)}, 2)),
                 id="parquet-and-jsonl-numeric-ids"),
    pytest.param({"toy.inter": table(RECBOLE_HEADER, rows(USERS_7, ISBNS), sep="\t"),
                  "toy.item": table(["item_id:token", "title:token_seq"], [(item, f"Title of {item}") for item in ISBNS], sep="\t")},
                 ["--source", "recbole", "--data_path", "{input}/toy.inter", *NOUNS, *SPLIT],
                 both(users_with_rows({"7": 4, "07": 4, "007": 4}), items_with_titles(ISBN_TITLES, 3)),
                 id="recbole-users-and-isbn-items"),
    # In text columns a missing-value marker is text: a title "NA" or "None" stays as written.
    pytest.param({"ratings.csv": ratings_csv(USERS_7, ITEMS),
                  "items.csv": table(["item_id", "name"], [("i1", "NA"), ("i2", "None"), ("i3", "null"), ("i4", "N/A")])},
                 table_args("ratings.csv", item_file="items.csv"),
                 items_with_titles({"i1": "NA", "i2": "None", "i3": "null", "i4": "N/A"}, 3), id="csv-titles-NA-None-kept"),
    # No rating or label: every row is a positive and negatives are sampled, so one class is expected.
    pytest.param({"orders.csv": table(["user_id", "item_id", "timestamp"], [(u, f"{i}-{u}", t) for u, i, t, _ in rows(USERS_7, ITEMS)])},
                 table_args("orders.csv", rating=None), both(users_with_rows({"7": 8, "07": 8, "007": 8}), sampled_negatives),
                 id="implicit-log-samples-negatives"),
]


@pytest.mark.parametrize("files, args, check", KEPT)
def test_ids_are_kept_as_written(tmp_path, capsys, files, args, check):
    """Each id as written is its own user or item, with its own rows and title."""
    outcome, output = run_case(tmp_path, capsys, files, args)
    assert outcome.code == 0, outcome.stderr[-2000:]
    check(load_prepared(output))
