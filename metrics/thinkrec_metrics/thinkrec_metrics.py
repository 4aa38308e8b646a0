"""ThinkRec's click-through and per-user ranking metrics as an `evaluate` metric.

Load it by path: ``evaluate.load("metrics/thinkrec_metrics")`` (config ``"warm_cold"`` adds the ``not_cold``
input and the warm/cold split). Every number comes from `thinkrec.evaluation.metrics.compute_metrics`; this
file only declares the inputs. `evaluate` copies this file alone into its modules cache before importing it,
so it imports the `thinkrec` package by its absolute name: the ThinkRec repository must be installed
(``pip install -e <repo>``) in the environment that loads the metric.
"""

import datasets
import evaluate


try:  # indented, so evaluate's import scan does not turn a missing package into "pip install thinkrec"
    from thinkrec.evaluation.metrics import DEFAULT_KS, compute_metrics
except ImportError as error:
    raise ImportError(
        "thinkrec_metrics computes with the `thinkrec` package, which this environment cannot import "
        f"({error}); install the ThinkRec repository in it (`pip install -e <path to the repository>`)."
    ) from error


_DESCRIPTION = """\
Click-through and per-user ranking metrics of a recommender that scores (user, item) rows: AUC over all rows,
UAUC (mean per-user AUC over users with both labels), GAUC (the same weighted by rows), and HR@k, NDCG@k and
MAP@k from ranking each user's own rows by score (ties: negatives first), with the counts they rest on. The
"warm_cold" configuration also reports every metric on warm (not_cold = 1) and cold (not_cold = 0) rows.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `float`): the score of each row (any monotone score: logit, probability).
    references (`list` of `int`): the label of each row, 0 or 1.
    user_ids (`list` of `str` or `int`): the user of each row; the per-user metrics group rows by it.
    not_cold (`list` of `int`, "warm_cold" configuration only): 1 for a row whose user and item were seen in
        training, 0 for a cold row.
    ks (`list` of `int`, optional, default [1, 3, 5, 10]): the cut-offs of HR@k, NDCG@k and MAP@k.
Returns:
    A flat dict of floats: auc, uauc, gauc, hr@k, ndcg@k, map@k for k in ks, n_rows, n_users, n_positive,
    n_negative, uauc_users, ranking_users; with "warm_cold" the same names prefixed warm/ and cold/. A metric
    that is undefined on its rows (one class only, no rows) is NaN and the counts say why.
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("metrics/thinkrec_metrics")
    >>> results = metric.compute(predictions=[0.9, 0.2, 0.4, 0.7], references=[1, 0, 0, 1],
    ...                          user_ids=["a", "a", "b", "b"], ks=[1])
    >>> results["auc"], results["uauc"], results["hr@1"]
    (1.0, 1.0, 1.0)
"""

_CITATION = ""  # the repository states no paper to cite for these definitions

CONFIGS = {"default": False, "warm_cold": True}  # configuration name -> whether rows carry not_cold


def input_features(user_id_type: str, with_not_cold: bool) -> datasets.Features:
    """The columns of one compute call; scores stay float64 so the numbers are the ones compute_metrics gives."""
    columns = {"predictions": datasets.Value("float64"), "references": datasets.Value("int64"),
               "user_ids": datasets.Value(user_id_type)}
    if with_not_cold:
        columns["not_cold"] = datasets.Value("int64")
    return datasets.Features(columns)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ThinkrecMetrics(evaluate.Metric):
    def _info(self):
        if self.config_name not in CONFIGS:
            raise ValueError(f"thinkrec_metrics: unknown configuration {self.config_name!r}; expected one of {sorted(CONFIGS)}.")
        with_not_cold = CONFIGS[self.config_name]
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # User ids as strings or as integers (records hold integers); the first option that fits is used.
            # No format="numpy": evaluate accepts it only with a single Features; the columns arrive as lists.
            features=[input_features("string", with_not_cold), input_features("int64", with_not_cold)],
            codebase_urls=["thinkrec/evaluation/metrics.py in the ThinkRec repository"],
        )

    def _compute(self, predictions, references, user_ids, not_cold=None, ks=DEFAULT_KS):
        return compute_metrics(user_ids, references, predictions, not_cold=not_cold, ks=tuple(ks))
