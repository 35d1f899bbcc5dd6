"""Command line: ``python -m llmpipe.cli params check | promote | lineage | serve | router | deploy``.

- params check: validate params.yaml (every section, typed) without running anything.
- promote: gate + workspace checks, then register a model version (git tag with lineage) and
  assign it to a stage (canary by default). Exit 2 with a clear message when refused.
- lineage: print the lineage JSON stored in a version tag.
- serve: start one engine (llama.cpp on CPU, vLLM on GPU) bound to loopback, until Ctrl-C.
- router: run the OpenAI-compatible canary router in front of running engines (optionally with
  the canary controller and a persistent state file).
- serve-stack up: the long-running router + stable engine + control API that live deploys target.
- user-traffic: a bounded user-traffic generator (tests, demos).
- deploy: one canary rollout of the pipeline's model (what ``stages/deploy.py`` runs).
- report: the pull-request report (Markdown): metrics, params and gate vs a base revision, plots.
- remote check: one request to a DVC remote (no retries): a clear error in seconds when the
  endpoint is unreachable or the credentials are refused, before ``dvc pull``/``dvc push``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from llmpipe.config import ParamsError
from llmpipe.config import load_params as load_typed_params


def _cmd_promote(args: argparse.Namespace) -> int:
    from llmpipe.registry import GtoError, PromotionRefused, promote

    cfg = load_typed_params(Path(args.repo) / args.params).registry
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
    from llmpipe.serve.engines import EngineError, EngineProcess, LlamaCppSpec, engine_spec, startup_timeout_s
    from llmpipe.serve.rollout import gguf_path

    scfg = load_typed_params(args.params).serve
    key = _api_key(args.api_key_env or scfg.api_key_env)
    host = args.host or scfg.host
    args.port = args.port or (scfg.stable_port if args.role == "stable" else scfg.canary_port)
    if args.engine == "vllm":
        loras = dict(item.split("=", 1) for item in args.lora)
        scfg = scfg.model_copy(update={"engine": "vllm"})
        spec = engine_spec(scfg.model_copy(update={"host": host}), model=args.model, port=args.port, api_key=key,
                           served_model=args.served_model, loras=loras)
    else:
        spec = LlamaCppSpec(model=gguf_path(args.model), host=host, port=args.port, api_key=key,
                            served_model=args.served_model, n_ctx=scfg.n_ctx, n_threads=scfg.n_threads)
    if args.print_command:
        print(" ".join(spec.command()))
        return 0
    eng = EngineProcess(spec, Path(args.log or f"deploy/logs/{args.role}.log"), name=f"{args.engine} engine")
    try:
        eng.start().wait_healthy(startup_timeout_s(scfg))
        print(f"serving {args.model} at {eng.url}/v1 (Ctrl-C to stop)", file=sys.stderr)
        _wait_for_signal()
    except EngineError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    finally:
        eng.stop()
    return 0


def _cmd_router(args: argparse.Namespace) -> int:
    from llmpipe.serve.compliance import ReplyValidator
    from llmpipe.serve.controller import CanaryController
    from llmpipe.serve.router import Backend, Router, run_async
    from llmpipe.serve.state import StateStore

    params = load_typed_params(args.params)
    scfg, dcfg = params.serve, params.deploy
    upstream_key = _api_key(args.upstream_key_env)
    stable = Backend(args.stable_version, args.stable, args.stable_model, upstream_key)
    canary = Backend(args.canary_version, args.canary, args.canary_model, upstream_key) if args.canary else None
    router = Router(stable, canary, weight=args.weight if canary else 0.0,
                    validator=ReplyValidator.from_file(dcfg.reply_schema),
                    public_model=scfg.public_model,
                    api_key=_api_key(args.api_key_env or scfg.api_key_env),
                    timeout_s=scfg.timeout_s, canary_timeout_s=scfg.canary_timeout_s)
    if args.control:
        if canary is None:
            print("router: --control needs --canary", file=sys.stderr)
            return 2
        store = StateStore(args.state, args.decisions)
        rel = lambda b: {"version": b.version, "url": b.url, "served_model": b.model,  # noqa: E731
                         "api_key": b.api_key, "sha256": b.version, "model": b.version}
        ctl = CanaryController.open(store, dcfg.thresholds, stable=rel(stable), canary=rel(canary),
                                    steps=dcfg.steps, baseline_size=dcfg.baseline_size)
        ctl.attach(router)

    async def main() -> None:
        port = await router.start(args.host or scfg.host, args.port if args.port is not None else scfg.router_port)
        print(f"router listening on port {port}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await router.stop()

    run_async(main())
    return 0


def _cmd_stack_up(args: argparse.Namespace) -> int:
    from llmpipe.serve.compliance import ReplyValidator
    from llmpipe.serve.rollout import gguf_path
    from llmpipe.serve.router import run_async
    from llmpipe.stack.service import ServingStack, StackError

    params = load_typed_params(args.params)
    scfg = params.serve
    seed = None
    if args.stable_model or args.stable_url:
        if not args.stable_version:
            print("serve-stack: --stable-version is required with --stable-model/--stable-url", file=sys.stderr)
            return 2
        seed = ({"version": args.stable_version, "model": gguf_path(args.stable_model)} if args.stable_model else
                {"version": args.stable_version, "sha256": f"url:{args.stable_url}", "url": args.stable_url,
                 "served_model": args.stable_served_model or args.stable_version,
                 "api_key_env": args.stable_key_env})
    try:
        stack = ServingStack(scfg, ReplyValidator.from_file(params.deploy.reply_schema),
                             os.environ.get(scfg.stack.control_key_env, ""),
                             state_dir=args.state_dir or scfg.stack.state_dir, router_port=args.router_port,
                             control_port=args.control_port, router_api_key=_api_key(scfg.api_key_env))
        run_async(stack.run(seed))
    except StackError as exc:
        print(f"serve-stack: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_user_traffic(args: argparse.Namespace) -> int:
    import threading

    from llmpipe.io import write_json
    from llmpipe.serve.router import run_async
    from llmpipe.serve.traffic import drive, load_prompts

    system = load_typed_params(args.params).validate_.default_system_prompt if args.params else None
    prompts = load_prompts(args.prompts, system_prompt=system)
    stop = threading.Event()   # SIGTERM/SIGINT: the users finish their requests in flight, then stop
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    result = run_async(drive(args.url, prompts, concurrency=args.concurrency, max_requests=args.max_requests,
                             max_seconds=args.max_seconds, max_tokens=args.max_tokens, pause_s=args.pause_s,
                             api_key=_api_key(args.api_key_env), stop=stop))
    summary = result.as_dict()
    if args.out:
        write_json(args.out, summary)
    print(json.dumps({k: summary[k] for k in ("sent", "ok", "failed", "by_version")}, sort_keys=True))
    return 0 if result.failed == 0 else 3


def _cmd_deploy(args: argparse.Namespace) -> int:
    from llmpipe.io import write_json, write_timings
    from llmpipe.model.source import ModelSourceError
    from llmpipe.serve.engines import EngineError
    from llmpipe.serve.rollout import DeployError, run_deploy
    from llmpipe.serve.state import StateError
    from llmpipe.serve.traffic import TrafficError

    params = load_typed_params(args.params)
    try:
        result = run_deploy(params.deploy, params.serve, params.registry, target=args.target,
                            system_prompt=params.validate_.default_system_prompt)
    except (DeployError, EngineError, ModelSourceError, StateError, TrafficError) as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    write_json(args.metrics, result.metrics)
    if result.timings:
        write_timings("deploy", result.timings)
    print(json.dumps({k: result.metrics.get(k) for k in ("decision", "stable_version", "canary_version",
                                                         "client_failures")}, sort_keys=True))
    if result.error:
        print(f"deploy: {result.error}", file=sys.stderr)
        return 1
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
    params = load_typed_params(args.params)  # ParamsError -> exit 2 with every problem, in main()
    sections = [name for name in type(params).model_fields if name != "seed"]
    print(f"{args.params or 'params.yaml'}: ok ({len(sections)} sections)")
    return 0


def _cmd_remote_check(args: argparse.Namespace) -> int:
    from llmpipe.remote import RemoteCheckError, check_remote

    try:
        res = check_remote(Path(args.repo), args.remote, args.timeout)
    except RemoteCheckError as exc:
        print(f"remote check failed: {exc}", file=sys.stderr)
        return 2
    print(f"remote '{res.name}' ok in {res.seconds:.1f} s: {res.detail}")
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

    s = sub.add_parser("serve-stack", help="the serving stack as a service: `serve-stack up` (docs/deploy.md)")
    ssub = s.add_subparsers(dest="stack_cmd", required=True)
    c = ssub.add_parser("up", help="run the router, the stable engine and the control API until SIGTERM")
    c.add_argument("--params", default="params.yaml")
    c.add_argument("--state-dir", help="default serve.stack.state_dir; a restart reads its state.json")
    c.add_argument("--stable-model", help="first start only: GGUF file or embedded:NAME for the stable engine")
    c.add_argument("--stable-url", help="first start only: a running engine's base URL instead")
    c.add_argument("--stable-version", help="first start only: the stable release's version name")
    c.add_argument("--stable-served-model", help="model name the remote stable engine serves (default: version)")
    c.add_argument("--stable-key-env", help="env var with the remote stable engine's API key")
    c.add_argument("--router-port", type=int, help="default serve.router_port (0: any free port)")
    c.add_argument("--control-port", type=int, help="default serve.stack.control_port (0: any free port)")
    c.set_defaults(func=_cmd_stack_up)

    s = sub.add_parser("user-traffic", help="bounded user-traffic generator (chat requests from a JSONL file)")
    s.add_argument("--url", required=True, help="router base URL")
    s.add_argument("--prompts", required=True, help="canonical JSONL records (e.g. data/split/test.jsonl)")
    s.add_argument("--params", help="params file whose validate.default_system_prompt is added to prompts")
    s.add_argument("--max-requests", type=int, required=True)
    s.add_argument("--max-seconds", type=float, required=True)
    s.add_argument("--concurrency", type=int, default=1)
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--pause-s", type=float, default=0.0, help="wait between one user's requests")
    s.add_argument("--api-key-env", help="env var with the router's client API key")
    s.add_argument("--out", help="write the summary (sent, ok, failed, failures, by_version) here")
    s.set_defaults(func=_cmd_user_traffic)

    s = sub.add_parser("deploy", help="one canary rollout (what stages/deploy.py runs)")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--target", help="local, or a serve-stack control API URL (default deploy.target)")
    s.add_argument("--metrics", default="metrics/deploy.json")
    s.set_defaults(func=_cmd_deploy)

    s = sub.add_parser("report", help="pull-request report (Markdown) of HEAD or the workspace vs a base revision")
    s.add_argument("--base", default="main", help="git revision to compare against (default: main)")
    s.add_argument("--head", help="git revision to report on (default: the workspace files)")
    s.add_argument("--repo", default=".")
    s.add_argument("--out", help="write the Markdown here (default: stdout)")
    s.add_argument("--link", action="append", default=[], help="extra Markdown line (e.g. a link to the plots HTML)")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("remote", help="DVC remote tools: `remote check` fails fast on a bad endpoint or credentials")
    rsub = s.add_subparsers(dest="remote_cmd", required=True)
    c = rsub.add_parser("check", help="one request to the remote, no retries; exit 2 with the reason on failure")
    c.add_argument("remote", nargs="?", default=None, help="remote name (default: the repo's default remote)")
    c.add_argument("--repo", default=".")
    c.add_argument("--timeout", type=float, default=10.0,
                   help="cap on the connect and read timeouts in seconds (the remote's own are used when lower)")
    c.set_defaults(func=_cmd_remote_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ParamsError as exc:
        print(f"llmpipe {args.cmd}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
