"""The file names that stages write into their last Ray Train checkpoint and that the driver, the
sweep and the tests read back: defined here once, so that a rename cannot part writer from reader.
(The purifier's own state keeps the model's weights under :data:`fip.purify.MODEL_STATE`: the
method's name, which the method cannot import from here.)
"""

METRICS = "metrics.json"  # every stage's metrics: the driver logs them, and keeps no file of them
FISHER = "fisher.safetensors"  # the Fisher stage's estimate
PURIFIED = "purified.safetensors"  # the purify stage's model ...
PURIFIED_SIDECAR = PURIFIED.rsplit(".", 1)[0] + ".json"  # ... and its metadata (fip.io.save_model's sidecar)
HISTORY = "history.json"  # the purify stage's step logs and evaluations
STATE = "state.pt"  # a resumable checkpoint's torch state (pipeline.workers.checkpoint) ...
LOGS = "logs.json"  # ... and its JSON logs
