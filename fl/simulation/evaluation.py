"""Utility metrics of a global model on a held-out split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from torch import nn

from fl.simulation.normalization import normalize


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 64,
) -> torch.Tensor:
    """Class probabilities (N, K) of ``model`` in evaluation mode for images in [0, 1]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True)
        out.append(F.softmax(model(normalize(x, mean, std)), dim=1).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, float | None]:
    """Accuracy, balanced accuracy, macro-F1, AUROC and cross-entropy loss.

    AUROC is one-vs-rest (macro) for more than two classes and the positive-class score for two;
    it is ``None`` when the split holds a single class (undefined), never NaN.
    """
    y = labels.cpu().numpy()
    p = probs.cpu().numpy().astype(np.float64)
    pred = p.argmax(axis=1)
    present = np.unique(y)
    auroc: float | None
    if present.size < 2:
        auroc = None
    elif num_classes == 2:
        auroc = float(roc_auc_score(y, p[:, 1]))
    else:
        # One-vs-rest macro average over the classes present in the split (sklearn's "ovr"
        # macro AUROC when all classes are present).
        auroc = float(np.mean([roc_auc_score(y == c, p[:, c]) for c in present]))
    eps = 1e-12
    loss = float(-np.mean(np.log(p[np.arange(len(y)), y] + eps)))
    return {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(
            f1_score(y, pred, average="macro", labels=np.arange(num_classes), zero_division=0)
        ),
        "auroc": auroc,
        "loss": loss,
    }


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    batch_size: int = 64,
) -> dict[str, float | None]:
    """Evaluate ``model`` on images in [0, 1]; see :func:`classification_metrics`."""
    return classification_metrics(
        predict(model, images, mean, std, batch_size), labels, num_classes
    )
