"""DVC stage ``deploy``: one canary rollout of the pipeline's model, decided on measured requests.

``deploy.target: local`` rehearses on loopback (own engines, router and generated traffic):
``serve.engine: llamacpp`` serves GGUF files, ``serve.engine: vllm`` HF dirs (``deploy.vllm``: the
merged model, or the LoRA adapter on the base model's server). A serve-stack control API URL rolls
the registry's ``canary`` version out on a live router's user traffic (refused inside ``dvc exp
run`` and from a dirty workspace).

in:  models/gguf/support-triage-q4_k_m.gguf (vLLM: models/merged or models/adapter, models/base),
     metrics/gate.json, data/split/test.jsonl, the registry (git tags),
     params registry / serve / deploy / validate.default_system_prompt
out: deploy/state.json, deploy/decisions.jsonl, deploy/releases/ (the stable model; persisted),
     metrics/deploy.json (decision, versions, steps, client failures, registry update)
     timings/deploy.json (duration, request counts, latencies; not a metric)
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from llmpipe.config import ParamsError, load_stage_params
from llmpipe.io import write_json, write_timings
from llmpipe.model.source import ModelSourceError
from llmpipe.serve.engines import EngineError
from llmpipe.serve.rollout import DeployError, run_deploy
from llmpipe.serve.state import StateError
from llmpipe.serve.traffic import TrafficError

PARAMS = ["registry", "serve", "deploy", "validate.default_system_prompt"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", type=Path, default=Path("metrics/deploy.json"))
    ap.add_argument("--params", type=Path, default=None, help="params file (default params.yaml)")
    args = ap.parse_args(argv)
    # SIGTERM (e.g. a cancelled `dvc repro`) unwinds normally, so engines are stopped and a live
    # rollout is put on hold (canary weight 0) with its lock released.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        cfg = load_stage_params(PARAMS, args.params)
        result = run_deploy(cfg.deploy, cfg.serve, cfg.registry, system_prompt=cfg.validate.default_system_prompt)
    except (DeployError, EngineError, ModelSourceError, ParamsError, StateError, TrafficError) as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    write_json(args.metrics, result.metrics)
    if result.timings:
        write_timings("deploy", result.timings)
    m = result.metrics
    print(f"deploy: {m['decision']} (stable {m.get('stable_version')}, canary {m.get('canary_version')}, "
          f"{m.get('client_failures', 0)} client failures)", file=sys.stderr)
    if result.error:
        print(f"deploy: {result.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
