"""Every string key fedsim puts in messages, records and metrics, defined once."""

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

# --- records inside a Flower Message ------------------------------------------------------------
ARRAYS = "arrays"  # Flower strategies' default ArrayRecord key (FedAvg.arrayrecord_key)
CONFIG = "config"  # Flower strategies' default ConfigRecord key (FedAvg.configrecord_key)
METRICS = "metrics"  # the reply's MetricRecord
NUM_EXAMPLES = "num-examples"  # Flower's default weighted_by_key
SERVER_ROUND = "server-round"  # injected by Flower strategies into the train config
PROXIMAL_MU = "proximal-mu"  # sent by Flower's FedProx; the client adds the proximal term
CLIENT_TERMS = "fedsim.client-terms"  # list[str]: registered client terms the client must add
WIDTH = "fedsim.width"  # float in (0, 1]: the width-sliced sub-model the client trains (slicing.py)
# Train-config keys and reply metrics starting with this prefix are per-client log fields: the
# scheduler copies them, prefix stripped, into the client's clients.jsonl row (e.g. "log.width",
# "log.utility", DFL's "log.dfl_beta"); they never overwrite a field the scheduler itself writes.
LOG_PREFIX = "log."
# int >= 1: train exactly this many mini-batch steps this round (FedCompass's Q_i), epochs as needed
LOCAL_STEPS = "fedsim.local-steps"

# --- client terms' knobs (ConfigRecord) and records (ArrayRecord) -------------------------------
SCAFFOLD_CONTROL = "scaffold.c"  # message: the server control variate c (one tensor per param)
SCAFFOLD_CONTROL_DELTA = "scaffold.delta-c"  # reply: c_i+ - c_i
SCAFFOLD_CLIENT_CONTROL = "scaffold.c-i"  # client state: the client control variate c_i
FEDNOVA_NORM = "fednova.a-norm"  # reply metric: ||a_i||_1, the client's normalizing factor
FEDDYN_ALPHA = "feddyn.alpha"
FEDDYN_GRAD = "feddyn.grad"  # client state: the linear term's gradient, grad L_i(theta_i^{t-1})
FEDSPEED_RHO = "fedspeed.rho"
FEDSPEED_LAMBDA = "fedspeed.lambda"
FEDSPEED_GRAD_CLIP = "fedspeed.grad-clip"
FEDSPEED_DUAL = "fedspeed.h"  # client state: h_i, the sum of the client's past updates
MOON_MU = "moon.mu"
MOON_TEMPERATURE = "moon.temperature"
MOON_PREVIOUS = "moon.previous"  # client state: representation weights of its last local model
# DFL (clients/distillation.py): knobs the wrapper adds to the train config, client state, message
DFL_TEMPERATURE = "dfl.temperature"
DFL_BETA0 = "dfl.beta0"
DFL_SCHEDULE = "dfl.beta-schedule"
DFL_RAMP_ROUNDS = "dfl.ramp-rounds"
DFL_TEACHER = "dfl.teacher"  # stale_local | global | class_global
DFL_T_SQUARED = "dfl.t-squared"  # bool: scale the KD term by T^2 (Hinton)
DFL_SOFT_TARGETS = "dfl.soft-targets"  # client state: (n, C) softmax(z / T) of its last local model
DFL_CLASS_STATS = "dfl.class-stats"  # client state: per-class sums (C, C) and counts (C,)
DFL_GENERATIONS = "dfl.generations"  # client state: how many rounds it trained under DFL
DFL_CLASS_TARGETS = "dfl.class-targets"  # message: the server's per-class average (C, C)
DFL_GLOBAL_READY = "dfl.global-ready"  # message (teacher global): the global model has trained
DFL_GLOBAL_TARGETS = "dfl.global-targets"  # on the client only: received model's (n, C) targets

# --- the lane envelope: one physical message carries several virtual clients --------------------
JOB = "fedsim.job"  # ConfigRecord: the resolved job config (YAML text) and its hash
JOB_YAML = "yaml"
JOB_HASH = "hash"
LANE = "fedsim.lane"  # ConfigRecord: which virtual clients ride in this message
LANE_PARTITION_IDS = "partition-ids"
LANE_CONTENT_INDEX = "content-index"  # per client: which deduplicated content it received
LANE_ERRORS = "errors"  # per client in a reply: "" or the error text
LANE_ATTEMPT = "attempt"  # 1 = the clients' first send this round; 2 = sent again (cohort.py)
LANE_TIMEOUT_S = "timeout-s"  # how long the server waits for this lane (absent: no limit)
LANE_HOLD_S = "hold-s"  # an empty lane (a probe) keeps its worker this long
CONTENT_PREFIX = "c"  # "c<k>/<record name>": k-th distinct content sent in a lane message
CLIENT_PREFIX = "p"  # "p<partition id>/<record name>": one client's reply records
STATE_PREFIX = "s"  # "s<partition id>/<record name>": one client's persistent state

# --- client metrics (MetricRecord of a reply) ----------------------------------------------------
TRAIN_LOSS = "train_loss"
TRAIN_STEPS = "train_steps"
EXTRA_UPLOAD_BYTES = "extra_upload_bytes"  # device uploads besides the returned tensors

# --- metrics.jsonl columns -----------------------------------------------------------------------
ROUND = "round"
PHASE = "phase"
ACCURACY = "accuracy"
LOSS = "loss"
MACRO_F1 = "macro_f1"
NUM_CLIENTS = "num_clients"
NUM_SAMPLED = "num_sampled"
NUM_FAILED = "num_failed"
BYTES_UP = "bytes_up"
BYTES_DOWN = "bytes_down"
WALL_TIME_S = "wall_time_s"
STARTUP_S = "startup_s"  # summary: seconds a run paid before its first round (engine, data, model)
SIM_TIME_S = "sim_time_s"  # cumulative simulated seconds
# metrics rows and summary, only when set: the architecture the clock charges instead of the
# model that trains (model.cost_backbone, fedsim/learning/cost_backbone.py)
COST_BACKBONE = "cost_backbone"
ROUND_TIME_S = "round_time_s"
NUM_STRAGGLERS = "num_stragglers"
NUM_OFFLINE = "num_offline"
NUM_INFEASIBLE = "num_infeasible"
ENERGY_J = "energy_j"
STALENESS_MEAN = "staleness_mean"  # asynchronous rows: global updates between download and merge
STALENESS_MAX = "staleness_max"
CYCLE = "cycle"  # warm-start rows (phase "warm_start", round 0): which cycle of the stage
WARM_START_CYCLES = "warm_start_cycles"  # totals: warm-start cycles done (a resumed run skips them)


# --- clients.jsonl: what became of one client-round ---------------------------------------------
class Outcome(StrEnum):
    """The ``outcome`` of a client-round (clients.jsonl), every one there is, defined once.

    A ``StrEnum``: a member equals its string, so rows written before this type existed (and
    read back from JSON as plain strings) compare, count and hash the same.
    """

    OK = "ok"  # trained, and its update was aggregated
    STRAGGLER = "straggler"  # trained, but past the round's deadline (clock.deadline_s): dropped
    OFFLINE = "offline"  # did not check in (availability; a phone's charging, network, battery)
    INFEASIBLE = "infeasible"  # its memory cannot hold the round: set aside, never sent
    FAILED = "failed"  # the client's code raised (an engine failure: see runtime.max_failed_rounds)
    # a phone that checked in and dropped out mid-round (fedsim/clock/phones.py): a failed
    # client-round, not an engine failure
    INTERRUPTED = "interrupted"
    # asynchronous loop (fedsim/rounds/asynchronous.py) only:
    LATE = "late"  # arrived after its group's latest time (FedCompass's general buffer); merged
    STALE = "stale"  # staler than the strategy accepts (FedBuff's max_staleness): dropped


# --- reading numbers back ------------------------------------------------------------------
_ABSENT = object()


def number(record: Mapping[str, Any], key: str, default: Any = _ABSENT) -> int | float:
    """The number ``record`` (a Config- or MetricRecord) holds under ``key``, as it was written.

    Flower's records type a value as any record value (a str, bytes, a list); a key fedsim or a
    strategy writes as a number that holds something else is a bug: a TypeError naming the key.
    ``default`` is returned when the key is absent (absent and no default: KeyError).
    """
    value = record[key] if default is _ABSENT else record.get(key, default)
    if not isinstance(value, int | float):
        raise TypeError(f"record key {key!r} holds {value!r}, not a number")
    return value


# --- node ids: Flower addresses virtual clients by node id, fedsim by partition id ---------
def node_id_of(partition_id: int) -> int:
    """Virtual node id of a partition id (node id 0 is the SuperLink's in Flower)."""
    return partition_id + 1


def partition_id_of(node_id: int) -> int:
    """Partition id of a virtual node id."""
    return node_id - 1
