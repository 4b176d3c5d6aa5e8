"""What a curious server can infer about labels from PAE MobiLLM payloads (issue 14 item 5).

Threat model: an honest-but-curious server runs the protocol and keeps every payload it
receives, knowing which device sent it. It knows the public frozen backbone (and so can compute
anything the backbone computes from what it receives), the class names, and the fleet's class
frequencies (e.g. from a public release). It does not know any device's label key, and it has no
labelled data of the task. It wants each sample's true label y.

What a PAE payload gives it (clients/side_tuning/tuning.py): the sample's quantized activations and
the key-permuted prediction difference ``delta = P_k (p_b - onehot(y))``, so, for each sample, the
permuted label ``pi_k(y) = argmin delta`` and the permuted base prediction ``P_k p_b``. Within one
key the permuted labels group the samples by class; the attacks below name the groups:

* :func:`frequency_attack`: rank the groups by size and match them to the classes ranked by the
  known frequencies (the prior attack; with one key for the fleet it pools every device).
* :func:`content_attack`: score every sample with a zero-shot classifier on its own activations
  (the public backbone's sentence embedding against the class names' embeddings: no labelled
  data needed) and give each group the class that maximises the summed log-scores, one class per
  group (Hungarian assignment, scipy ``linear_sum_assignment``).
* :func:`base_attack`: when the device's base prediction p_b is a public function of the backbone
  (a zero-shot head), the server recomputes it in true order from the activations and matches the
  permuted copy inside delta entry by entry.

Chance is what the prior alone gives: always guessing the most frequent class
(:func:`majority_rate`). All functions are pure: arrays in, guesses out.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedsim.clients.side_tuning.network import unpack_tokens
from fedsim.learning.models import pool_hidden_states

__all__ = [
    "assign_groups",
    "base_attack",
    "content_attack",
    "frequency_attack",
    "majority_rate",
    "received_embeddings",
    "recovery_rate",
]


def assign_groups(score: np.ndarray) -> np.ndarray:
    """Group j -> class: the one-to-one assignment maximising the summed ``score[j, c]`` (C, C)."""
    rows, cols = linear_sum_assignment(score, maximize=True)
    mapping = np.empty(score.shape[0], dtype=np.int64)
    mapping[rows] = cols
    return mapping


def _per_device(
    groups: np.ndarray, devices: np.ndarray, score_fn: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Guesses: per device, its groups named by :func:`assign_groups` on ``score_fn(rows)``.

    ``score_fn`` gets the indices of one device's samples and returns (C, C) scores.
    """
    guesses = np.empty(len(groups), dtype=np.int64)
    for device in np.unique(devices):
        idx = np.flatnonzero(devices == device)
        guesses[idx] = assign_groups(score_fn(idx))[groups[idx]]
    return guesses


def frequency_attack(
    groups: np.ndarray, devices: np.ndarray, class_counts: np.ndarray
) -> np.ndarray:
    """Name each device's groups by size rank against the known class frequencies."""
    c = len(class_counts)
    # score[j, c] = -|rank of group j by size - rank of class c by frequency|: the assignment
    # pairs the k-th largest group with the k-th most frequent class (ties broken by index).
    class_rank = np.empty(c)
    class_rank[np.argsort(-class_counts, kind="stable")] = np.arange(c)

    def score(idx: np.ndarray) -> np.ndarray:
        sizes = np.bincount(groups[idx], minlength=c)
        group_rank = np.empty(c)
        group_rank[np.argsort(-sizes, kind="stable")] = np.arange(c)
        return -np.abs(group_rank[:, None] - class_rank[None, :])

    return _per_device(groups, devices, score)


def content_attack(groups: np.ndarray, devices: np.ndarray, log_scores: np.ndarray) -> np.ndarray:
    """Name each device's groups by the summed zero-shot log-scores (n, C) of their samples."""
    c = log_scores.shape[1]

    def score(idx: np.ndarray) -> np.ndarray:
        out = np.zeros((c, c))
        np.add.at(out, groups[idx], log_scores[idx])  # out[j] = sum of the group's log-scores
        return out

    return _per_device(groups, devices, score)


def base_attack(
    groups: np.ndarray, devices: np.ndarray, base_seen: np.ndarray, base_public: np.ndarray
) -> np.ndarray:
    """Match the permuted base probabilities (n, C) to their recomputation in true order (n, C).

    ``base_seen[i, j]`` is p_b of sample i at permuted index j (delta + onehot at argmin);
    ``base_public[i, c]`` the server's own p_b of class c. Index j of device k holds class c
    where the two columns agree over the device's samples.
    """

    def score(idx: np.ndarray) -> np.ndarray:
        seen, public = base_seen[idx], base_public[idx]  # (m, C) each
        return -np.abs(seen[:, :, None] - public[:, None, :]).sum(axis=0)  # (C, C)

    return _per_device(groups, devices, score)


def recovery_rate(guesses: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose label the attack got right."""
    return float(np.mean(np.asarray(guesses) == np.asarray(labels)))


def majority_rate(labels: np.ndarray, class_counts: np.ndarray) -> float:
    """Chance: the share right when always guessing the most frequent class (prior only)."""
    return float(np.mean(np.asarray(labels) == int(np.argmax(class_counts))))


def received_embeddings(
    activations: torch.Tensor, token_mask: torch.Tensor | None, pooling: str
) -> torch.Tensor:
    """The server's copy of each sample's pooled last-layer embedding (n, d) from a payload.

    ``activations`` (M, K, d) are the dequantized token vectors, the last tap being the
    backbone's last layer (clients/side_tuning/network.py ``select_layers`` always taps it). With
    the pivot token (``token_mask`` None) each sample's vector is already pooled as the head pools.
    """
    last = activations[:, -1:].float()  # (M, 1, d)
    if token_mask is None:
        return last[:, 0]
    dense = unpack_tokens(last, token_mask)[:, 0]  # (n, T, d), zeros at pads
    return pool_hidden_states(dense, token_mask, pooling)  # type: ignore[arg-type]
