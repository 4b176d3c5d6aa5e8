"""Every string key fedsim puts in messages, records and metrics, defined once."""

# --- records inside a Flower Message ------------------------------------------------------------
ARRAYS = "arrays"  # Flower strategies' default ArrayRecord key (FedAvg.arrayrecord_key)
CONFIG = "config"  # Flower strategies' default ConfigRecord key (FedAvg.configrecord_key)
METRICS = "metrics"  # the reply's MetricRecord
NUM_EXAMPLES = "num-examples"  # Flower's default weighted_by_key
SERVER_ROUND = "server-round"  # injected by Flower strategies into the train config
PROXIMAL_MU = "proximal-mu"  # sent by Flower's FedProx; the client adds the proximal term

# --- the lane envelope: one physical message carries several virtual clients --------------------
JOB = "fedsim.job"  # ConfigRecord: the resolved job config (YAML text) and its hash
JOB_YAML = "yaml"
JOB_HASH = "hash"
LANE = "fedsim.lane"  # ConfigRecord: which virtual clients ride in this message
LANE_PARTITION_IDS = "partition-ids"
LANE_CONTENT_INDEX = "content-index"  # per client: which deduplicated content it received
LANE_ERRORS = "errors"  # per client in a reply: "" or the error text
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
ROUND_TIME_S = "round_time_s"
NUM_STRAGGLERS = "num_stragglers"
NUM_OFFLINE = "num_offline"
NUM_INFEASIBLE = "num_infeasible"
ENERGY_J = "energy_j"
