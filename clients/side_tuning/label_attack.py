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
(:func:`majority_rate`). The attacks are pure functions: arrays in, guesses out.
:func:`observe_one_round` records what the server sees in one real client-round of the showcase,
and :func:`attack_rates` scores every attack on it, for the test and for
``python -m fedsim.scripts.pae_attacks`` (the table in results/README.md) alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import datasets
import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from hydra.utils import instantiate
from scipy.optimize import linear_sum_assignment

from fedsim.clients.side_tuning.network import (
    SideTunedModel,
    class_names_of,
    unpack_tokens,
    zero_shot_logits,
)
from fedsim.clients.side_tuning.quantize import dequantize
from fedsim.clients.side_tuning.tuning import DevicePayload
from fedsim.config import compose_config
from fedsim.learning.models import TextClassifier, pool_hidden_states
from fedsim.learning.workload import get_workload
from fedsim.training.contract import TrainContext

__all__ = [
    "ATTACKS",
    "assign_groups",
    "attack_rates",
    "base_attack",
    "content_attack",
    "frequency_attack",
    "majority_rate",
    "observe_one_round",
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


def observe_one_round(overrides: Sequence[str] = (), seed: int = 0) -> dict[str, np.ndarray]:
    """Every payload of one client-round of each of the showcase's phones, as the server sees it.

    ``experiment=mobile_side_tuning client=pae_side_tuning`` (one local epoch) plus
    ``overrides``; each phone trains once from the initial model. Arrays, one row per sample:
    ``device`` (sender), ``label`` (the truth, for scoring only), ``delta`` (the permuted
    prediction difference), ``embedding`` (the received last-layer embedding), and what the
    attacker computes from public parts alone: ``log_scores`` and ``base_public`` (the public
    backbone's zero-shot head on the embedding, log-softmax and softmax) and ``counts`` (the
    fleet's class frequencies).
    """
    cfg = compose_config(
        [
            "experiment=mobile_side_tuning",
            "client=pae_side_tuning",
            f"seed={seed}",
            "client.local_epochs=1",
            *overrides,
        ]
    )
    workload = get_workload(cfg)
    client = instantiate(cfg.client)
    model = workload.build_model()
    assert isinstance(model, SideTunedModel)
    pooling = model.pooling
    parts: dict[str, list[np.ndarray]] = {"device": [], "label": [], "delta": [], "embedding": []}
    for pid in range(int(cfg.num_clients)):
        data = workload.client_data(pid)
        sent: list[DevicePayload] = []
        client.uplink_observer = sent.append
        ctx = TrainContext(
            partition_id=pid,
            server_round=1,
            config=ConfigRecord(),
            generator=torch.Generator().manual_seed(1),
            state=RecordDict(),
        )
        client.train(model, data, ctx)
        for p in sent:
            assert p.delta is not None, "PAE's additive option sends a delta per sample"
            parts["device"].append(np.full(len(p.sample_ids), pid))
            parts["label"].append(data["label"][p.sample_ids.long()].numpy())
            parts["delta"].append(p.delta.float().numpy())
            embedding = received_embeddings(dequantize(p.activations), p.token_mask, pooling)
            parts["embedding"].append(embedding.numpy())
    out = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    # What the attacker computes with the public backbone: the class names' embeddings.
    names = class_names_of(workload.splits.train)
    inner: TextClassifier = workload.model_factory.inner  # type: ignore[attr-defined]
    text = inner.featurize(
        datasets.Dataset.from_dict({"text": names, "label": list(range(len(names)))})
    )
    with torch.no_grad():
        backbone = inner.build(1).backbone.eval()
        hidden = backbone(**{k: text[k] for k in ("input_ids", "attention_mask")})
    prototypes = pool_hidden_states(hidden.last_hidden_state, text["attention_mask"], "mean")
    scale = float(cfg.client.zero_shot_scale)  # public: part of the protocol
    scores = zero_shot_logits(torch.from_numpy(out["embedding"]), prototypes, scale)
    out["log_scores"] = torch.log_softmax(scores, dim=1).numpy()
    out["base_public"] = torch.softmax(scores, dim=1).numpy()
    out["counts"] = np.bincount(np.asarray(workload.splits.train["label"]), minlength=len(names))
    return out


# name -> (the observation's key design, the attack, whether the devices' groups are pooled)
ATTACKS: dict[str, tuple[str, str, bool]] = {
    "frequency, one fleet key (pooled)": ("fleet_key", "frequency", True),
    "frequency, per-device keys": ("per_device", "frequency", False),
    "frequency, per-device keys pooled": ("per_device", "frequency", True),
    "content, per-device keys": ("per_device", "content", False),
    "content, one fleet key": ("fleet_key", "content", False),
    "content, one fleet key (pooled)": ("fleet_key", "content", True),
    "base, zero-shot base head": ("zero_shot", "base", False),
}

# the observation each key design needs: the overrides of observe_one_round
OBSERVATIONS: dict[str, tuple[str, ...]] = {
    "fleet_key": ("client.per_device_keys=false",),
    "per_device": (),
    "zero_shot": ("client.base_head=zero_shot",),
}


def rate_of(observed: dict[str, np.ndarray], attack: str, pooled: bool = False) -> float:
    """Recovery rate of one attack on what :func:`observe_one_round` returned."""
    groups = observed["delta"].argmin(axis=1)  # pi_k(y): the server's own training target
    devices = np.zeros_like(observed["device"]) if pooled else observed["device"]
    if attack == "frequency":
        guess = frequency_attack(groups, devices, observed["counts"])
    elif attack == "content":
        guess = content_attack(groups, devices, observed["log_scores"])
    elif attack == "base":
        seen = observed["delta"].copy()
        seen[np.arange(len(groups)), groups] += 1.0  # p_b in the key's order
        guess = base_attack(groups, devices, seen, observed["base_public"])
    else:
        raise ValueError(f"unknown attack {attack!r}")
    return recovery_rate(guess, observed["label"])


def attack_rates(seed: int) -> dict[str, float]:
    """Every attack of :data:`ATTACKS` on one round of seed ``seed``, with chance and content alone.

    Each seed is another data split, partition and set of keys.
    """
    observed = {
        name: observe_one_round(overrides, seed) for name, overrides in OBSERVATIONS.items()
    }
    per_device = observed["per_device"]
    rates = {"chance": majority_rate(per_device["label"], per_device["counts"])}
    rates["zero-shot content alone"] = recovery_rate(
        per_device["log_scores"].argmax(axis=1), per_device["label"]
    )
    for name, (design, attack, pooled) in ATTACKS.items():
        rates[name] = rate_of(observed[design], attack, pooled)
    return rates
