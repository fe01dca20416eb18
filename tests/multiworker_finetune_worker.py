"""One worker of the two-process fine-tuning tests under MultiWorkerMirroredStrategy.

Run by `tests/test_distributed_methods.py` as

    TF_CONFIG='{"cluster": {...}, "task": {...}}' \
        python tests/multiworker_finetune_worker.py REPORT.json CONFIG.json

with the repository root on `PYTHONPATH`. It runs
`keras_seltransfer.training.finetune` with the `FinetuneConfig` fields of
CONFIG.json and `strategy="multi_worker"`, and writes this worker's report
(every worker evaluates the model; only the chief writes the run's outputs)
to REPORT.json.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def main(report_path, config_path):
    from keras_seltransfer import training

    with open(config_path) as f:
        fields = json.load(f)
    config = training.FinetuneConfig(**fields, strategy="multi_worker")
    outputs = training.finetune(config)
    with open(report_path, "w") as f:
        json.dump(outputs["report"], f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
