"""DVC stage ``deploy``: one bounded canary rollout of the pipeline's GGUF on loopback (CPU).

in:  models/gguf/support-triage-q4_k_m.gguf, metrics/gate.json, data/split/test.jsonl, the registry (git
     tags), params serve.* / deploy.* / registry.*
out: deploy/state.json, deploy/decisions.jsonl, deploy/releases/ (the stable GGUF; persisted),
     metrics/deploy.json
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmpipe.model.source import ModelSourceError  # noqa: E402
from llmpipe.params import ParamsError, load_params  # noqa: E402
from llmpipe.serve.engines import EngineError  # noqa: E402
from llmpipe.serve.rollout import DeployError, run_deploy  # noqa: E402
from llmpipe.serve.state import StateError  # noqa: E402
from llmpipe.serve.traffic import TrafficError  # noqa: E402


def main() -> int:
    # SIGTERM (e.g. a cancelled `dvc repro`) unwinds normally, so the engines are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        params = load_params()
        metrics = run_deploy(params, ".", state_path="deploy/state.json", log_path="deploy/decisions.jsonl",
                             releases_dir="deploy/releases", metrics_path="metrics/deploy.json")
    except (DeployError, EngineError, ModelSourceError, ParamsError, StateError, TrafficError, ValueError) as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    print(f"deploy: {metrics['decision']} (stable {metrics.get('stable_version')}, "
          f"canary {metrics.get('canary_version')}, {metrics.get('requests', 0)} requests, "
          f"{metrics.get('client_failures', 0)} client failures)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
