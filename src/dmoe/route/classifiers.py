"""Classifiers over unit-length embeddings: centroids, kNN, logistic regression.

Each is a small set of arrays (saved with safetensors, never pickled) and a pure
``predict_proba``. :func:`fit` builds one by name; the router trainer fits all three
and keeps the one with the best held-out accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("centroid", "knn", "logreg")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class Classifier:
    kind: str
    arrays: dict[str, np.ndarray]  # centroid: centroids; knn: points, labels; logreg: coef, intercept
    n_classes: int
    temperature: float = 0.05  # centroid / knn: similarity -> probability sharpness
    k: int = 10

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, D) unit rows -> (N, C) probabilities."""
        a = self.arrays
        if self.kind == "centroid":
            return softmax(x @ a["centroids"].T / self.temperature)
        if self.kind == "knn":
            sims = x @ a["points"].T  # (N, M)
            k = min(self.k, sims.shape[1])
            nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            w = softmax(np.take_along_axis(sims, nearest, 1) / self.temperature)  # (N, k)
            out = np.zeros((x.shape[0], self.n_classes), np.float64)
            np.add.at(out, (np.arange(x.shape[0])[:, None], a["labels"][nearest].astype(int)), w)
            return out
        return softmax(x @ a["coef"].T + a["intercept"])


def _centroids(x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    c = np.stack([x[y == i].mean(0) for i in range(n)])
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def fit(kind: str, x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0) -> Classifier:
    """Fit a classifier of ``kind`` on embeddings ``x`` (N, D) and labels ``y`` (N,)."""
    if kind == "centroid":
        return Classifier(kind, {"centroids": _centroids(x, y, n_classes).astype(np.float32)}, n_classes)
    if kind == "knn":
        return Classifier(kind, {"points": x.astype(np.float32), "labels": y.astype(np.int64)}, n_classes)
    if kind == "logreg":
        from sklearn.linear_model import LogisticRegression

        m = LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced", random_state=seed).fit(x, y)
        coef, intercept = m.coef_, m.intercept_
        if n_classes == 2 and coef.shape[0] == 1:  # sklearn's binary form -> two logits
            coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        return Classifier(kind, {"coef": coef.astype(np.float32), "intercept": intercept.astype(np.float32)}, n_classes)
    raise ValueError(f"classifier must be one of {', '.join(KINDS)}, not {kind!r}")
