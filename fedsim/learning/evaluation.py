"""Centralized evaluation on the held-out test split: accuracy, loss, macro-F1.

Also the per-client evaluation of the final global model (fairness across clients):
:func:`evaluate_clients` on the clients picked by :func:`sample_eval_clients`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from fedsim.learning.placement import model_device, to_device
from fedsim.seeding import numpy_rng

__all__ = [
    "RemembersBatches",
    "evaluate",
    "evaluate_clients",
    "iterate_batches",
    "macro_f1",
    "sample_eval_clients",
]

ALL_CLIENTS = "all"  # eval.num_clients_final: score every client


@runtime_checkable
class RemembersBatches(Protocol):
    """A model that remembers what it computed for evaluation batches it expects to see again.

    Side-tuning's server keeps its reconstruction of the test split's batches (the same tensors
    every round). A client's data is scored once, by :func:`evaluate_clients`, which then has
    the model forget: otherwise one-off batches (on a GPU, fresh copies each) would stay.
    """

    def forget_batches(self) -> None:
        """Drop every remembered batch (the next evaluation computes them again, identically)."""


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
    Classes absent from both labels and predictions do not count (as sklearn's ``f1_score``
    with ``labels=None, zero_division=0``, which :func:`macro_f1` equals).

    Each batch runs where ``model`` lives (the server's ``runtime.server_device``); the
    predictions come back to CPU. On CPU the moves are no-ops.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    losses, preds, labels_all = [], [], []
    for inputs, labels in iterate_batches(data, batch_size):
        logits = model(**to_device(inputs, device))
        labels_on = labels.to(device)
        losses.append(torch.nn.functional.cross_entropy(logits, labels_on, reduction="sum").item())
        preds.append(logits.argmax(dim=1).cpu().numpy())
        labels_all.append(labels.cpu().numpy())
    model.train(was_training)
    y_pred, y_true = np.concatenate(preds), np.concatenate(labels_all)
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "loss": float(sum(losses) / len(y_true)),
        "macro_f1": macro_f1(y_true, y_pred),
    }


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean over the classes present (in labels or predictions) of 2TP/(2TP+FP+FN)."""
    classes, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    true, pred = codes[: len(y_true)], codes[len(y_true) :]
    k = len(classes)
    tp = np.bincount(true[true == pred], minlength=k)
    denominator = np.bincount(true, minlength=k) + np.bincount(pred, minlength=k)  # 2TP+FP+FN
    f1 = np.divide(2 * tp, denominator, out=np.zeros(k), where=denominator > 0)
    return float(f1.mean()) if k else 0.0


def sample_eval_clients(num_clients: int, num_final: int | str, seed: int) -> list[int]:
    """Partition ids the final model is scored on: every client, or a seeded sample of them.

    ``num_final`` is ``"all"`` or a count; a count of at least ``num_clients`` means every
    client, 0 means none. The sample is a function of ``seed`` alone (not of the run's history),
    so runs of a sweep that share a seed score the same clients.
    """
    if num_final == ALL_CLIENTS or int(num_final) >= num_clients:
        return list(range(num_clients))
    rng = numpy_rng(seed, "final-client-eval")
    return sorted(int(p) for p in rng.choice(num_clients, size=int(num_final), replace=False))


def evaluate_clients(
    model: torch.nn.Module,
    client_data_fn: Callable[[int], dict[str, torch.Tensor]],
    partition_ids: Sequence[int],
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """Accuracy and mean cross-entropy of ``model`` on each client's local data.

    ``client_data_fn(pid)`` gives a client's features (``Workload.client_data``: its training
    partition, the only local data a client has). Returns one row per client, in the order of
    ``partition_ids``: ``partition_id``, ``num_examples``, ``accuracy``, ``loss``; a client with
    no examples has ``accuracy`` and ``loss`` None.
    """
    rows: list[dict[str, Any]] = []
    for pid in partition_ids:
        data = client_data_fn(pid)
        num_examples = len(data["label"])
        scores = evaluate(model, data, batch_size) if num_examples else {}
        if isinstance(model, RemembersBatches):
            model.forget_batches()  # this client's batches come no more
        rows.append(
            {
                "partition_id": int(pid),
                "num_examples": num_examples,
                "accuracy": scores.get("accuracy"),
                "loss": scores.get("loss"),
            }
        )
    return rows
