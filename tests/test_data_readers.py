"""Readers: RecBole atomic files, generic tables (Amazon reviews, order logs), CoLLM splits."""

import json
import pickle
from pathlib import Path

import pandas as pd
import pytest

from thinkrec.data.readers import (
    ColumnMapping,
    DataFormatError,
    bundled_ml100k_dir,
    read_collm_splits,
    read_interaction_table,
    read_ml100k,
    read_recbole_atomic,
)


BENCHMARK_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml1m-collm"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def recbole_files(tmp_path):
    inter = write(
        tmp_path / "toy.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\ti1\t5\t100\nu1\ti2\t2\t200\nu2\ti1\t4\t150\n",
    )
    write(
        tmp_path / "toy.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        'i1\tHeat "Director\'s Cut"\t1995\tAction Crime\ni2\tClueless\tunknown\tComedy\n',
    )
    return inter


def test_recbole_atomic_reads_typed_headers_titles_years_and_genres(recbole_files):
    log = read_recbole_atomic(recbole_files)
    assert log.feedback == "rating"
    assert log.interactions[["user", "item"]].values.tolist() == [["u1", "i1"], ["u1", "i2"], ["u2", "i1"]]
    assert log.interactions["timestamp"].tolist() == [100, 200, 150]
    assert log.interactions["rating"].tolist() == [5.0, 2.0, 4.0]
    titles = dict(zip(log.items["item"], log.items["title"]))
    # The year is appended MovieLens-style only when it is a year; quotes survive (no CSV quoting).
    assert titles == {"i1": 'Heat "Director\'s Cut" (1995)', "i2": "Clueless"}
    assert dict(zip(log.items["item"], log.items["genres"]))["i1"] == "Action|Crime"


def test_recbole_header_without_types_is_rejected(tmp_path):
    path = write(tmp_path / "bad.inter", "user_id\titem_id\n1\t2\n")
    with pytest.raises(DataFormatError, match=r"bad.inter.*'user_id'.*name:type"):
        read_recbole_atomic(path)


def test_non_numeric_rating_names_file_column_and_value(tmp_path):
    path = write(
        tmp_path / "r.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t2\tfive\t10\n"
    )
    with pytest.raises(DataFormatError, match=r"r.inter.*'rating'.*'five'"):
        read_recbole_atomic(path)


def test_bundled_ml100k_is_found_without_importing_recbole():
    import sys

    folder = bundled_ml100k_dir()
    assert (folder / "ml-100k.inter").is_file()
    assert "recbole" not in sys.modules
    log = read_ml100k()
    assert len(log.interactions) == 100_000
    assert log.interactions["user"].nunique() == 943
    assert log.interactions["item"].nunique() == 1682
    assert (log.items["title"] != "").all()


def test_amazon_review_recipe(tmp_path):
    """Amazon reviews (reviewerID, asin, overall, unixReviewTime) + metadata (asin, title)."""
    reviews = tmp_path / "Beauty_reviews.jsonl"
    rows = [
        {"reviewerID": "A1", "asin": "B001", "overall": 5.0, "unixReviewTime": 1300000000, "reviewText": "great"},
        {"reviewerID": "A1", "asin": "B002", "overall": 1.0, "unixReviewTime": 1300000500, "reviewText": "bad"},
        {"reviewerID": "A2", "asin": "B001", "overall": 4.0, "unixReviewTime": 1300000100, "reviewText": "ok"},
    ]
    write(reviews, "\n".join(json.dumps(r) for r in rows) + "\n")
    meta = tmp_path / "meta_Beauty.jsonl"
    write(
        meta,
        "\n".join(
            json.dumps(r)
            for r in [
                {"asin": "B001", "title": "Rose Lip Balm", "categories": "Beauty, Lips"},
                {"asin": "B002", "title": "Nail Polish Remover", "categories": "Beauty, Nails"},
            ]
        )
        + "\n",
    )
    columns = ColumnMapping(user="reviewerID", item="asin", time="unixReviewTime", rating="overall", title="title", genres="categories")
    log = read_interaction_table(reviews, columns, item_path=meta, genres_separator=",")
    assert log.feedback == "rating"
    assert log.interactions["user"].tolist() == ["A1", "A1", "A2"]
    assert dict(zip(log.items["item"], log.items["title"])) == {"B001": "Rose Lip Balm", "B002": "Nail Polish Remover"}
    assert dict(zip(log.items["item"], log.items["genres"]))["B001"] == "Beauty|Lips"


def test_list_valued_metadata_columns_are_read_as_lists(tmp_path):
    """Amazon 2014 `categories` is a list of category paths; 2018 `description` is a list of strings."""
    reviews = write(tmp_path / "reviews.csv", "reviewerID,asin,unixReviewTime\nA1,B001,1\nA1,B002,2\nA2,B003,3\n")
    meta = write(
        tmp_path / "meta.jsonl",
        "\n".join(
            json.dumps(r)
            for r in [
                {"asin": "B001", "title": "Face Cream", "categories": [["Beauty", "Skin Care", "Face"], ["Beauty", "Makeup"]],
                 "description": ["Light.", "Non-greasy."]},
                {"asin": "B002", "title": "Lip Balm", "categories": ["Beauty", "Lips"], "description": "Soft."},
                {"asin": "B003", "title": "Nail File", "categories": [], "description": []},
            ]
        )
        + "\n",
    )
    columns = ColumnMapping(user="reviewerID", item="asin", time="unixReviewTime", title="title", genres="categories",
                            description="description")
    for separator in (None, ","):
        log = read_interaction_table(reviews, columns, item_path=meta, genres_separator=separator)
        genres = dict(zip(log.items["item"], log.items["genres"]))
        assert genres == {"B001": "Beauty|Skin Care|Face|Makeup", "B002": "Beauty|Lips", "B003": ""}
        assert dict(zip(log.items["item"], log.items["description"])) == {"B001": "Light. Non-greasy.", "B002": "Soft.", "B003": ""}
    # The same lists written into a CSV cell as text (Python or JSON literals) are parsed too.
    write(tmp_path / "meta.csv", 'asin,title,categories\nB001,Face Cream,"[[\'Beauty\', \'Skin Care\']]"\n'
          'B002,Lip Balm,"[""Beauty"", ""Lips""]"\nB003,Nail File,Tools\n')
    log = read_interaction_table(reviews, ColumnMapping(user="reviewerID", item="asin", time="unixReviewTime", title="title",
                                                        genres="categories"), item_path=tmp_path / "meta.csv")
    assert dict(zip(log.items["item"], log.items["genres"])) == {"B001": "Beauty|Skin Care", "B002": "Beauty|Lips", "B003": "Tools"}


@pytest.mark.parametrize("value", [[{"name": "Beauty"}], [[["Beauty"]]], "[['Beauty', 'Lips']"])
def test_metadata_list_of_unknown_shape_names_column_and_value(tmp_path, value):
    reviews = write(tmp_path / "reviews.csv", "reviewerID,asin,unixReviewTime\nA1,B001,1\n")
    meta = write(tmp_path / "meta.jsonl", json.dumps({"asin": "B001", "title": "Face Cream", "categories": value}) + "\n")
    columns = ColumnMapping(user="reviewerID", item="asin", time="unixReviewTime", title="title", genres="categories")
    with pytest.raises(DataFormatError, match=r"meta.jsonl: column 'categories' row 0: expected text, a list of strings or a "
                                              r"list of lists of strings, found .*Beauty"):
        read_interaction_table(reviews, columns, item_path=meta)


def test_html_entities_in_titles_are_unescaped(tmp_path):
    orders = write(
        tmp_path / "orders.csv",
        "user,item,time,name,kind\n"
        "c1,p1,1,Tom &amp; Jerry,Bath &amp; Body\nc1,p2,2,Caf&eacute; &#39;Noir&#39;,Food\nc2,p3,3,Q&A &notes,Books\n",
    )
    log = read_interaction_table(orders, ColumnMapping(user="user", item="item", time="time", title="name", genres="kind"))
    titles = dict(zip(log.items["item"], log.items["title"]))
    # Only complete entities (with their ';') are decoded: "&notes" is text, not the entity "&not".
    assert titles == {"p1": "Tom & Jerry", "p2": "Café 'Noir'", "p3": "Q&A &notes"}
    assert dict(zip(log.items["item"], log.items["genres"]))["p1"] == "Bath & Body"


def test_delivery_hero_order_log_recipe(tmp_path):
    """Order logs: customer, product, order time (dates), product name, all in one file; implicit."""
    orders = write(
        tmp_path / "orders.csv",
        "customer_id,product_id,order_time,product_name\n"
        "c1,p1,2022-02-01 12:00:00,Margherita Pizza\n"
        "c1,p2,2022-02-02 19:30:00,Pad Thai\n"
        "c2,p1,2022-02-01T13:00:00,Margherita Pizza\n",
    )
    columns = ColumnMapping(user="customer_id", item="product_id", time="order_time", title="product_name")
    log = read_interaction_table(orders, columns)
    assert log.feedback == "implicit"
    assert log.interactions["timestamp"].tolist() == [1643716800, 1643830200, 1643720400]
    assert dict(zip(log.items["item"], log.items["title"])) == {"p1": "Margherita Pizza", "p2": "Pad Thai"}


def test_missing_column_names_file_role_and_available_columns(tmp_path):
    path = write(tmp_path / "x.csv", "user,item,ts\n1,2,3\n")
    with pytest.raises(DataFormatError, match=r"x.csv.*time='timestamp'.*\['user', 'item', 'ts'\]"):
        read_interaction_table(path, ColumnMapping(user="user", item="item"))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_interaction_table(tmp_path / "nope.csv", ColumnMapping())
    path = write(tmp_path / "data.txt", "a")
    with pytest.raises(DataFormatError, match="file_format"):
        read_interaction_table(path, ColumnMapping())


def test_unparseable_dates_are_reported(tmp_path):
    path = write(tmp_path / "o.csv", "user_id,item_id,timestamp\n1,2,yesterday\n")
    with pytest.raises(DataFormatError, match=r"o.csv.*'timestamp'.*'yesterday'"):
        read_interaction_table(path, ColumnMapping())


def _collm_frame(flag):
    return pd.DataFrame(
        {
            "uid": [1, 1],
            "iid": [3, 4],
            "label": [1, 0],
            "timestamp": [10, 20],
            "his": [[0], [0, 3]],
            "his_title": [[""], ["", "C (2000)"]],
            "title": ["C (2000)", "D (2001)"],
            "flag": [flag, flag],
            "not_cold": [1, 1],
        }
    )


def test_collm_pickles_are_refused_unless_opted_in(tmp_path):
    for stem, flag in (("train", -1), ("valid", 0), ("test", 1)):
        with open(tmp_path / f"{stem}.pkl", "wb") as handle:
            pickle.dump(_collm_frame(flag), handle)
    with pytest.raises(PermissionError, match="allow_pickle"):
        read_collm_splits(tmp_path)
    presplit = read_collm_splits(tmp_path, allow_pickle=True)
    assert set(presplit.splits) == {"train", "validation", "test"}
    assert len(presplit.splits["test"]) == 2


def test_collm_missing_columns(tmp_path):
    for stem in ("train", "valid", "test"):
        _collm_frame(0).drop(columns=["his"]).to_parquet(tmp_path / f"{stem}.parquet")
    with pytest.raises(DataFormatError, match=r"train.*\['his'\]"):
        read_collm_splits(tmp_path)


@pytest.mark.needs_benchmark_data
@pytest.mark.skipif(not BENCHMARK_DATA.is_dir(), reason=f"benchmark split not present at {BENCHMARK_DATA}")
def test_ml1m_collm_split_reads():
    presplit = read_collm_splits(BENCHMARK_DATA)
    assert {k: len(v) for k, v in presplit.splits.items()} == {"train": 33_891, "validation": 10_401, "test": 7_331}
    assert len(presplit.items) == 3_255


def test_recbole_sequence_files_are_read_with_order_as_time(tmp_path):
    """RecBole's sequential benchmark files hold one user's sequence per line and no timestamp; they used
    to stop with "no timestamp field"."""
    from thinkrec.data.readers import read_recbole_atomic

    inter = tmp_path / "games.train.inter"
    inter.write_text(
        "user_id:token\titem_id_list:token_seq\titem_id:token\n"
        "u1\ta b c\td\n"
        "u2\tc\ta\n"
        "u2\tc a\tb\n",  # a prefix line of the same user (RecBole writes one per target): the longest wins
        encoding="utf-8",
    )
    log = read_recbole_atomic(inter)
    frame = log.interactions.sort_values(["user", "timestamp"])
    assert frame.groupby("user")["item"].apply(list).to_dict() == {"u1": ["a", "b", "c", "d"], "u2": ["c", "a", "b"]}
    assert frame.groupby("user")["timestamp"].apply(list).to_dict() == {"u1": [0, 1, 2, 3], "u2": [0, 1, 2]}
    assert "rating" not in frame and "label" not in frame  # implicit: negatives are sampled at preparation

    inter.write_text("user_id:token\titem_id_list:token_seq\titem_id:token\nu1\ta b\tc\nu1\tx\ty\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="user 'u1'.*not a prefix"):
        read_recbole_atomic(inter)
