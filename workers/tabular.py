"""Tabular classifiers for the Iris data: logistic regression and a small MLP.

Iris is 150 rows, so a model trains full-batch in well under a second and the
number that means anything is cross-validated accuracy: stratified k-fold, each
fold standardized with its own training rows' statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STEPS = 500  # full-batch Adam steps; both models converge well before this
LR = 0.05
WEIGHT_DECAY = 1e-3


@dataclass(frozen=True)
class Table:
    x: np.ndarray  # (N, F) float32
    y: np.ndarray  # (N,) int64
    features: list[str]
    classes: list[str]


def load_iris() -> Table:
    """Fisher's Iris data as scikit-learn ships it (no download)."""
    from sklearn.datasets import load_iris as sk_iris

    d = sk_iris()
    return Table(d.data.astype(np.float32), d.target.astype(np.int64),
                 [str(f) for f in d.feature_names], [str(c) for c in d.target_names])


def build(arch: str, n_features: int, n_classes: int) -> nn.Module:
    """``logreg``: one linear layer (multinomial logistic regression); ``mlp``: one
    hidden layer of 16. Raises ValueError for another name."""
    if arch == "logreg":
        return nn.Linear(n_features, n_classes)
    if arch == "mlp":
        return nn.Sequential(nn.Linear(n_features, 16), nn.ReLU(), nn.Linear(16, n_classes))
    raise ValueError(f"unknown tabular model {arch!r}")


def fit(arch: str, x: np.ndarray, y: np.ndarray, n_classes: int, seed: int
        ) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """Train on (x, y); return the model and the standardization (mean, std) it expects."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(y)
    model = build(arch, x.shape[1], n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval(), mean, std


@torch.no_grad()
def accuracy(model: nn.Module, mean: np.ndarray, std: np.ndarray, x: np.ndarray,
             y: np.ndarray) -> float:
    pred = model(torch.from_numpy((x - mean) / std)).argmax(1).numpy()
    return float((pred == y).mean())


def stratified_folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, test rows) for each of ``k`` folds, every class spread evenly over
    the test folds, seeded: scikit-learn's ``StratifiedKFold``."""
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros((len(y), 1)), y))


def cross_validate(arch: str, table: Table, k: int = 5, seed: int = 0) -> dict[str, Any]:
    """Stratified k-fold accuracy of ``arch``: per fold, their mean and std."""
    n_classes = len(table.classes)
    scores = []
    for i, (train_rows, test_rows) in enumerate(stratified_folds(table.y, k, seed)):
        model, mean, std = fit(arch, table.x[train_rows], table.y[train_rows], n_classes,
                               seed + i)
        scores.append(accuracy(model, mean, std, table.x[test_rows], table.y[test_rows]))
    return {"folds": scores, "cv_acc": float(np.mean(scores)),
            "cv_std": float(np.std(scores, ddof=1)), "k": k}
