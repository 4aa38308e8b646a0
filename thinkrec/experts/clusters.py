"""User clusters for the LoRA experts: standardise CF user vectors, then k-means or Ward.

The fitted scaler and the standardised centroids are what `experts_thinkrec.UserRouter` stores in
the model, so routing at inference needs no side file.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field

import numpy as np
from joblib import Memory
from sklearn.cluster import AgglomerativeClustering, KMeans, MiniBatchKMeans
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import StandardScaler

from thinkrec.utils.errors import InputError


CLUSTER_METHODS = ("kmeans", "ward")

# Silhouette is O(N²); a seeded sample keeps choosing k fast on large user tables.
SILHOUETTE_SAMPLE = 5_000
# Above this many users k-means runs in mini-batches (full KMeans gets slow, the result barely changes).
MINIBATCH_ABOVE = 20_000


@dataclass
class UserClusters:
    """A clustering of users: labels, standardised centroids, the scaler, and its quality."""

    labels: np.ndarray  # [N] cluster of each user, 0..k-1
    centroids: np.ndarray  # [k, d] mean standardised vector of each cluster
    scaler_mean: np.ndarray  # [d]
    scaler_scale: np.ndarray  # [d]
    silhouette: float  # on the fitted k (NaN when undefined: every user its own cluster)
    sizes: np.ndarray  # [k] users per cluster
    method: str
    num_clusters: int  # the k used, given or chosen
    silhouette_by_k: dict[int, float] = field(default_factory=dict)  # candidates when k was chosen

    def summary(self) -> dict:
        """JSON-ready summary: users per cluster, silhouette, method and k."""
        return {
            "method": self.method,
            "num_clusters": self.num_clusters,
            "num_users": int(self.labels.shape[0]),
            "users_per_cluster": [int(n) for n in self.sizes],
            "silhouette": _json_float(self.silhouette),
            "silhouette_by_k": {str(k): _json_float(s) for k, s in self.silhouette_by_k.items()},
        }


def _json_float(value: float) -> float | None:
    # JSON has no NaN; None says "undefined" without breaking strict readers.
    return None if value is None or not math.isfinite(value) else float(value)


def fit_user_clusters(
    vectors: np.ndarray,
    num_clusters: int | None,
    method: str = "ward",
    seed: int = 0,
    max_clusters: int = 10,
) -> UserClusters:
    """Standardise `vectors` [N, d] and cluster them into `num_clusters` groups (None: best silhouette in 2..max)."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"user vectors must be a non-empty [users, dim] array, found shape {x.shape}")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InputError(
            f"user vectors have non-finite values: row {bad[0]} (first of {bad.size} bad rows); "
            "drop users without a CF vector before clustering"
        )
    if method not in CLUSTER_METHODS:
        raise InputError(f"unknown clustering method {method!r}; expected one of {CLUSTER_METHODS}")
    num_users = x.shape[0]
    if num_clusters is not None:
        if num_clusters < 2:
            raise InputError(f"need at least 2 user clusters, found num_clusters={num_clusters}")
        if num_users < num_clusters:
            raise InputError(f"cannot make {num_clusters} clusters from {num_users} users: more clusters than users")
    else:
        if max_clusters < 2:
            raise InputError(f"need at least 2 user clusters, found max_clusters={max_clusters}")
        # Silhouette needs at least one cluster with two users, hence k <= N - 1.
        if num_users < 3:
            raise InputError(f"choosing k by silhouette needs at least 3 users, found {num_users}")

    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    with tempfile.TemporaryDirectory() as cache:
        # Ward's merge tree is computed once and cut at every candidate k (joblib caches it).
        cluster = _clusterer(method, seed, num_users, Memory(cache, verbose=0))
        silhouette_by_k: dict[int, float] = {}
        if num_clusters is None:
            labels_by_k = {}
            for k in range(2, min(max_clusters, num_users - 1) + 1):
                labels_by_k[k] = cluster(z, k)
                silhouette_by_k[k] = _silhouette(z, labels_by_k[k], seed)
            # Ties go to the smaller k: fewer experts for the same separation.
            num_clusters = max(silhouette_by_k, key=lambda k: (silhouette_by_k[k], -k))
            labels = labels_by_k[num_clusters]
        else:
            labels = cluster(z, num_clusters)
    sizes = np.bincount(labels, minlength=num_clusters)
    if (sizes == 0).any():
        raise InputError(
            f"{method} left {(sizes == 0).sum()} of {num_clusters} clusters empty: the {num_users} user vectors "
            "have fewer distinct values than clusters; ask for fewer clusters"
        )
    # Centroids as per-cluster means in the standardised space, for both methods, so routing compares
    # like with like (MiniBatchKMeans' own centers are only approximately these means).
    centroids = np.stack([z[labels == g].mean(axis=0) for g in range(num_clusters)])
    silhouette = silhouette_by_k.get(num_clusters)
    if silhouette is None:
        silhouette = _silhouette(z, labels, seed)
    return UserClusters(
        labels=labels,
        centroids=centroids,
        scaler_mean=scaler.mean_.copy(),
        scaler_scale=scaler.scale_.copy(),
        silhouette=silhouette,
        sizes=sizes,
        method=method,
        num_clusters=int(num_clusters),
        silhouette_by_k=silhouette_by_k,
    )


def _clusterer(method: str, seed: int, num_users: int, memory: Memory):
    """A function (z, k) -> labels [N] for the chosen method."""

    def ward(z: np.ndarray, k: int) -> np.ndarray:
        model = AgglomerativeClustering(n_clusters=k, linkage="ward", memory=memory, compute_full_tree=True)
        return model.fit_predict(z).astype(np.int64)

    def kmeans(z: np.ndarray, k: int) -> np.ndarray:
        if num_users > MINIBATCH_ABOVE:
            model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096)
        else:
            model = KMeans(n_clusters=k, random_state=seed, n_init=10)
        return model.fit_predict(z).astype(np.int64)

    return ward if method == "ward" else kmeans


def _silhouette(z: np.ndarray, labels: np.ndarray, seed: int) -> float:
    distinct = np.unique(labels).size
    if not 2 <= distinct <= z.shape[0] - 1:
        return float("nan")
    sample = SILHOUETTE_SAMPLE if z.shape[0] > SILHOUETTE_SAMPLE else None
    return float(silhouette_score(z, labels, sample_size=sample, random_state=seed))


def train_user_vectors(model, train_rows) -> tuple[np.ndarray, np.ndarray]:
    """(user ids [N], CF vectors [N, d]) of the users in `train_rows` (a DataFrame or `datasets.Dataset`
    of records), read from `model`'s frozen CF tables: the user table row for MF / LightGCN, the
    SASRec encoding of the user's last liked history for SASRec (as the model routes them)."""
    import torch

    if getattr(model.config, "cf_model_type", "none") == "none":
        raise InputError("user clusters need CF user vectors, but the model has no CF tables (cf_model_type 'none').")
    user_ids = np.asarray(train_rows["UserID"], dtype=np.int64)
    if user_ids.size == 0:
        raise InputError("user clusters need training rows, but the train split is empty.")
    # The last row of each user (the split is in time order) carries the user's latest history.
    order = np.arange(len(user_ids))
    last_row = {int(user): int(row) for user, row in zip(user_ids, order)}
    users = np.array(sorted(last_row), dtype=np.int64)
    with torch.no_grad():
        if model.config.cf_model_type != "sasrec":
            if users.min() < 1 or users.max() >= model.config.num_users:
                bad = users[(users < 1) | (users >= model.config.num_users)][0]
                raise InputError(f"UserID {bad} has no row in the CF user table (ids 1..{model.config.num_users - 1}).")
            table = model.user_table.weight.detach().float().cpu().numpy()
            return users, table[users]
        histories = train_rows["HisItemIDs"]
        labels = train_rows["HisItemLabels"] if "HisItemLabels" in getattr(train_rows, "columns", getattr(train_rows, "column_names", [])) else None
        sequences = []
        for user in users:
            row = last_row[int(user)]
            items = list(histories[row])
            if labels is not None and labels[row] is not None and len(labels[row]):
                items = [item for item, label in zip(items, labels[row]) if label == 1]
            sequences.append(items)
        length = max(1, max(len(items) for items in sequences))
        padded = np.zeros((len(sequences), length), dtype=np.int64)
        for index, items in enumerate(sequences):
            if items:
                padded[index, length - len(items):] = items
        encoder = model.sequence_encoder
        device = next(encoder.parameters()).device
        vectors = [encoder.encode(torch.from_numpy(padded[start:start + 1024]).to(device)).float().cpu().numpy()
                   for start in range(0, len(padded), 1024)]
    return users, np.concatenate(vectors)
