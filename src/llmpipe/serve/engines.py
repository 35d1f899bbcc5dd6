"""Start/stop OpenAI-compatible inference engines as child processes bound to loopback.

- CPU (default): llama.cpp's server from llama-cpp-python (``python -m llama_cpp.server``)
  serving a GGUF file.
- GPU: vLLM (``vllm serve``) serving a merged HF model, optionally with LoRA adapters loaded at
  run time (``--enable-lora --lora-modules name=path``). vLLM is GPU-only; only its command
  construction is tested here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


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

    @staticmethod
    def check_installed() -> None:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise EngineError("llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')")


@dataclass
class VllmSpec:
    """vLLM OpenAI-compatible server: a merged model, or a base model plus LoRA adapters."""

    model: str                                   # HF dir or hub id (the merged or base model)
    host: str = "127.0.0.1"
    port: int = 8001
    api_key: str | None = None
    served_model: str | None = None
    loras: dict[str, str] = field(default_factory=dict)   # name -> adapter dir (multi-LoRA)
    max_lora_rank: int | None = None
    max_loras: int | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    dtype: str | None = None
    extra_args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        cmd = ["vllm", "serve", self.model, "--host", self.host, "--port", str(self.port)]
        if self.served_model:
            cmd += ["--served-model-name", self.served_model]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        if self.loras:
            cmd += ["--enable-lora", "--lora-modules"]
            cmd += [f"{name}={path}" for name, path in sorted(self.loras.items())]
            if self.max_lora_rank:
                cmd += ["--max-lora-rank", str(self.max_lora_rank)]
            if self.max_loras:
                cmd += ["--max-loras", str(self.max_loras)]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        return cmd + list(self.extra_args)

    @staticmethod
    def check_installed() -> None:
        import shutil

        if shutil.which("vllm") is None:
            raise EngineError("vLLM is not installed (GPU only: pip install -e .[gpu])")


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
                                     env={**os.environ, **(env or {})}, start_new_session=True,
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


def _redact(cmd: list[str]) -> list[str]:
    out, hide = [], False
    for part in cmd:
        out.append("***" if hide else part)
        hide = part in ("--api_key", "--api-key")
    return out
