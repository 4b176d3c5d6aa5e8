"""Centralized evaluation on the held-out test split: accuracy, loss, macro-F1."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score

__all__ = ["evaluate", "iterate_batches"]


def iterate_batches(data: dict[str, torch.Tensor], batch_size: int):  # noqa: ANN201
    """Yield ``(inputs, labels)`` slices of a feature dict in order (no shuffling)."""
    n = len(data["label"])
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in data.items()}
        labels = batch.pop("label")
        yield batch, labels


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: dict[str, torch.Tensor], batch_size: int = 256
) -> dict[str, float]:
    """Accuracy, mean cross-entropy and macro-F1 of ``model`` on ``data``.

    Macro-F1 matters on chatterbot, whose topics are very unequal (2,100 vs 9 utterances).
    Classes absent from both labels and predictions do not count (sklearn ``labels=None``).
    """
    was_training = model.training
    model.eval()
    losses, preds, labels_all = [], [], []
    for inputs, labels in iterate_batches(data, batch_size):
        logits = model(**inputs)
        losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item())
        preds.append(logits.argmax(dim=1).numpy())
        labels_all.append(labels.numpy())
    model.train(was_training)
    y_pred, y_true = np.concatenate(preds), np.concatenate(labels_all)
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "loss": float(sum(losses) / len(y_true)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
