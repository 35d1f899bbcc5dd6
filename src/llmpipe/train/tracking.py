"""Experiment tracking with dvclive: per-step metrics (plots) and a summary.

``dvclive`` is the tracker only (no DVC import here). Plots land in
``<dir>/plots/metrics/{train,eval}/*.tsv`` with the global step as x axis, which
``dvc plots show/diff`` renders. On resume the existing step files are kept (``resume=True``).
"""

from __future__ import annotations

from typing import Any

# Trainer log keys worth plotting, mapped to dvclive metric names.
PLOT_KEYS = {
    "loss": "train/loss",
    "eval_loss": "eval/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "num_input_tokens_seen": "train/tokens_seen",
}


def make_dvclive_callback(directory: str, resume: bool):
    """A TrainerCallback that logs every Trainer log event to dvclive at ``state.global_step``."""
    from dvclive import Live
    from transformers import TrainerCallback

    class DVCLiveCallback(TrainerCallback):
        def __init__(self):
            self.live: Any = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero and self.live is None:
                # dvcyaml=None: the pipeline's dvc.yaml declares the plots; dvclive must not edit it.
                self.live = Live(dir=directory, resume=resume, dvcyaml=None, save_dvc_exp=False,
                                 report=None)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.live is None or not logs:
                return
            self.live.step = state.global_step
            for key, name in PLOT_KEYS.items():
                if key in logs and isinstance(logs[key], (int, float)):
                    self.live.log_metric(name, float(logs[key]))

        def on_train_end(self, args, state, control, **kw):
            pass

        def finish(self, summary: dict[str, Any]) -> None:
            """Write the final summary (``<dir>/metrics.json``) and close."""
            if self.live is None:
                return
            for k, v in summary.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.live.summary[k] = v
            self.live.make_summary()
            self.live.end()
            self.live = None

    return DVCLiveCallback()
