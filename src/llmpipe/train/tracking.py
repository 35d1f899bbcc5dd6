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


def make_dvclive_callback(directory: str):
    """A TrainerCallback that logs every Trainer log event to dvclive at ``state.global_step``.

    Whether the plots continue or start over is decided when training begins: a run resumed
    from a checkpoint (``state.global_step > 0`` then) keeps the rows up to that step and drops
    the ones the interrupted run logged after it; a fresh run starts new files.
    """
    from dvclive import Live
    from transformers import TrainerCallback

    class DVCLiveCallback(TrainerCallback):
        def __init__(self):
            self.live: Any = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero and self.live is None:
                resume = state.global_step > 0
                if resume:
                    truncate_plots(directory, state.global_step)
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


def truncate_plots(directory: str, last_step: int) -> None:
    """Drop the rows after ``last_step`` from every ``<directory>/plots/metrics/**/*.tsv``."""
    from pathlib import Path

    for tsv in sorted(Path(directory, "plots", "metrics").rglob("*.tsv")):
        lines = tsv.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines:
            continue
        col = lines[0].rstrip("\n").split("\t").index("step") if "step" in lines[0] else None
        if col is None:
            continue
        kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[col]) <= last_step]
        if len(kept) != len(lines):
            tsv.write_text("".join(kept), encoding="utf-8")
