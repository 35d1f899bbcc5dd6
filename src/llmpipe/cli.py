"""Command line: ``python -m llmpipe.cli params check | promote | lineage | serve | router | deploy``.

- params check: validate params.yaml (every section, typed) without running anything.
- promote: gate + workspace checks, then register a model version (git tag with lineage) and
  assign it to a stage (canary by default). Exit 2 with a clear message when refused.
- lineage: print the lineage JSON stored in a version tag.
- serve: start one engine (llama.cpp on CPU, vLLM on GPU) bound to loopback, until Ctrl-C.
- router: run the OpenAI-compatible canary router in front of running engines (optionally with
  the canary controller and a persistent state file).
- deploy: one bounded canary rollout of the pipeline's model (what ``stages/deploy.py`` runs).
- report: the pull-request report (Markdown): metrics, params and gate vs a base revision, plots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from llmpipe.config import ParamsError as TypedParamsError
from llmpipe.params import ParamsError, load_params


def _cmd_promote(args: argparse.Namespace) -> int:
    from llmpipe.registry import GtoError, PromotionRefused, promote

    params = load_params(Path(args.repo) / args.params)
    cfg = dict(params.get("registry") or {})
    try:
        res = promote(args.repo, cfg, version=args.version, stage=args.stage,
                      check_dvc=False if args.skip_dvc_status else None)
    except PromotionRefused as exc:
        print(f"promote refused: {exc}", file=sys.stderr)
        return 2
    except (GtoError, ValueError) as exc:
        print(f"promote failed: {exc}", file=sys.stderr)
        return 1
    verb = "registered" if res.created else "already registered"
    lin = res.lineage
    print(f"{res.tag} {verb}; stage '{res.stage}' assigned")
    print(f"  commit {lin.get('git', {}).get('commit')}  dataset {lin.get('dataset_version')}  "
          f"base {lin.get('base_model')}  gate passed={((lin.get('metrics') or {}).get('gate') or {}).get('passed')}")
    print(f"  see: gto show {res.artifact}  |  gto history {res.artifact}")
    return 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    from llmpipe.registry import GtoError, Registry

    try:
        print(json.dumps(Registry(args.repo).lineage(args.artifact, args.version), indent=2, sort_keys=True))
    except GtoError as exc:
        print(f"lineage: {exc}", file=sys.stderr)
        return 1
    return 0


def _api_key(env_name: str | None) -> str | None:
    return os.environ.get(env_name) if env_name else None


def _wait_for_signal() -> None:
    stop = {"flag": False}

    def handler(*_: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop["flag"]:
        signal.pause()


def _cmd_serve(args: argparse.Namespace) -> int:
    from llmpipe.serve.engines import EngineError, EngineProcess, LlamaCppSpec, VllmSpec
    from llmpipe.serve.rollout import gguf_path

    params = load_params(args.params) if Path(args.params).exists() else {}
    scfg = params.get("serve") or {}
    key = _api_key(args.api_key_env or scfg.get("api_key_env"))
    host = args.host or scfg.get("host", "127.0.0.1")
    args.port = args.port or int(scfg.get(f"{args.role}_port", 8001 if args.role == "stable" else 8002))
    if args.engine == "vllm":
        vcfg = scfg.get("vllm") or {}
        loras = dict(item.split("=", 1) for item in args.lora)
        spec = VllmSpec(model=args.model, host=host, port=args.port, api_key=key, served_model=args.served_model,
                        loras=loras, max_lora_rank=vcfg.get("max_lora_rank"), max_model_len=vcfg.get("max_model_len"),
                        gpu_memory_utilization=vcfg.get("gpu_memory_utilization"))
    else:
        spec = LlamaCppSpec(model=gguf_path(args.model), host=host, port=args.port, api_key=key,
                            served_model=args.served_model, n_ctx=int(scfg.get("n_ctx", 2048)),
                            n_threads=scfg.get("n_threads"))
    if args.print_command:
        print(" ".join(spec.command()))
        return 0
    eng = EngineProcess(spec, Path(args.log or f"deploy/logs/{args.role}.log"), name=f"{args.engine} engine")
    try:
        eng.start().wait_healthy(float(scfg.get("startup_timeout_s", 180)))
        print(f"serving {args.model} at {eng.url}/v1 (Ctrl-C to stop)", file=sys.stderr)
        _wait_for_signal()
    except EngineError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    finally:
        eng.stop()
    return 0


def _cmd_router(args: argparse.Namespace) -> int:
    from llmpipe.serve.analysis import Thresholds
    from llmpipe.serve.compliance import ReplyValidator
    from llmpipe.serve.controller import CanaryController
    from llmpipe.serve.router import Backend, Router, run_async
    from llmpipe.serve.state import StateStore

    params = load_params(args.params) if Path(args.params).exists() else {}
    scfg, dcfg = params.get("serve") or {}, params.get("deploy") or {}
    upstream_key = _api_key(args.upstream_key_env)
    stable = Backend(args.stable_version, args.stable, args.stable_model, upstream_key)
    canary = Backend(args.canary_version, args.canary, args.canary_model, upstream_key) if args.canary else None
    router = Router(stable, canary, weight=args.weight if canary else 0.0,
                    validator=ReplyValidator.from_file(dcfg.get("reply_schema")),
                    public_model=scfg.get("public_model", "llmpipe"),
                    api_key=_api_key(args.api_key_env or scfg.get("api_key_env")),
                    timeout_s=float(scfg.get("timeout_s", 300)),
                    canary_timeout_s=float(scfg.get("canary_timeout_s", 60)))
    if args.control:
        if canary is None:
            print("router: --control needs --canary", file=sys.stderr)
            return 2
        store = StateStore(args.state, args.decisions)
        rel = lambda b: {"version": b.version, "url": b.url, "served_model": b.model,  # noqa: E731
                         "api_key": b.api_key, "sha256": b.version, "model": b.version}
        ctl = CanaryController.open(store, Thresholds.from_params(dcfg.get("thresholds") or {}),
                                    stable=rel(stable), canary=rel(canary),
                                    steps=dcfg.get("steps", [0.25, 0.5, 1.0]),
                                    baseline_size=int(dcfg.get("baseline_size", 200)))
        ctl.attach(router)

    async def main() -> None:
        port = await router.start(args.host or scfg.get("host", "127.0.0.1"),
                                  args.port if args.port is not None else int(scfg.get("router_port", 8000)))
        print(f"router listening on port {port}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await router.stop()

    run_async(main())
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from llmpipe.serve.engines import EngineError
    from llmpipe.serve.rollout import DeployError, run_deploy
    from llmpipe.serve.state import StateError
    from llmpipe.serve.traffic import TrafficError

    try:
        metrics = run_deploy(load_params(args.params))
    except (DeployError, EngineError, StateError, TrafficError, ValueError) as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: metrics.get(k) for k in ("decision", "stable_version", "canary_version",
                                                  "requests", "client_failures")}, sort_keys=True))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from llmpipe.report import ReportError, build_report

    try:
        text = build_report(args.repo, args.base, args.head, links=args.link)
    except ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_params_check(args: argparse.Namespace) -> int:
    from llmpipe.config import load_params as load_typed_params

    params = load_typed_params(args.params)  # ParamsError -> exit 2 with every problem, in main()
    sections = [name for name in type(params).model_fields if name != "seed"]
    print(f"{args.params or 'params.yaml'}: ok ({len(sections)} sections)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmpipe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("params", help="params.yaml tools: `params check` validates it, running nothing")
    psub = s.add_subparsers(dest="params_cmd", required=True)
    c = psub.add_parser("check", help="validate a params file against the typed config; exit 2 on errors")
    c.add_argument("--params", default=None, help="default: $LLMPIPE_PARAMS or params.yaml")
    c.set_defaults(func=_cmd_params_check)

    s = sub.add_parser("promote", help="register the model at HEAD as a version and assign a stage")
    s.add_argument("--repo", default=".")
    s.add_argument("--params", default="params.yaml", help="relative to --repo")
    s.add_argument("--version", help="vMAJOR.MINOR.PATCH (default: bump registry.bump)")
    s.add_argument("--stage", help="stage to assign (default registry.stage)")
    s.add_argument("--skip-dvc-status", action="store_true", help="skip the `dvc status` check")
    s.set_defaults(func=_cmd_promote)

    s = sub.add_parser("lineage", help="print the lineage stored in a version tag")
    s.add_argument("version")
    s.add_argument("--artifact", default="model")
    s.add_argument("--repo", default=".")
    s.set_defaults(func=_cmd_lineage)

    s = sub.add_parser("serve", help="start one engine on loopback until Ctrl-C")
    s.add_argument("--engine", choices=["llamacpp", "vllm"], default="llamacpp")
    s.add_argument("--model", required=True, help="GGUF file / embedded:NAME (llamacpp), HF dir (vllm)")
    s.add_argument("--served-model", help="model name reported by the engine")
    s.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="vLLM LoRA adapter")
    s.add_argument("--host")
    s.add_argument("--role", choices=["stable", "canary"], default="stable",
                   help="default port: serve.stable_port / serve.canary_port")
    s.add_argument("--port", type=int)
    s.add_argument("--api-key-env", help="env var with the API key (default serve.api_key_env)")
    s.add_argument("--log", help="engine log file (default deploy/logs/ROLE.log)")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--print-command", action="store_true", help="print the engine command and exit")
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("router", help="run the canary router in front of running engines")
    s.add_argument("--stable", required=True, help="stable engine base URL")
    s.add_argument("--stable-version", default="stable")
    s.add_argument("--stable-model", help="model name to send to the stable engine")
    s.add_argument("--canary", help="canary engine base URL")
    s.add_argument("--canary-version", default="canary")
    s.add_argument("--canary-model")
    s.add_argument("--weight", type=float, default=0.0, help="canary share without --control")
    s.add_argument("--control", action="store_true", help="run the canary controller (deploy.* params)")
    s.add_argument("--state", default="deploy/state.json")
    s.add_argument("--decisions", default="deploy/decisions.jsonl")
    s.add_argument("--host")
    s.add_argument("--port", type=int, help="default serve.router_port")
    s.add_argument("--api-key-env", help="env var with the router's client API key")
    s.add_argument("--upstream-key-env", help="env var with the engines' API key")
    s.add_argument("--params", default="params.yaml")
    s.set_defaults(func=_cmd_router)

    s = sub.add_parser("deploy", help="one bounded canary rollout (same as stages/deploy.py)")
    s.add_argument("--params", default="params.yaml")
    s.set_defaults(func=_cmd_deploy)

    s = sub.add_parser("report", help="pull-request report (Markdown) of HEAD or the workspace vs a base revision")
    s.add_argument("--base", default="main", help="git revision to compare against (default: main)")
    s.add_argument("--head", help="git revision to report on (default: the workspace files)")
    s.add_argument("--repo", default=".")
    s.add_argument("--out", help="write the Markdown here (default: stdout)")
    s.add_argument("--link", action="append", default=[], help="extra Markdown line (e.g. a link to the plots HTML)")
    s.set_defaults(func=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ParamsError, TypedParamsError) as exc:
        print(f"llmpipe {args.cmd}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
