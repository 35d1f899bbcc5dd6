"""Engine launchers (llama.cpp, vLLM command construction), reply validation, prompts, and the
router against a real llama.cpp engine on loopback (slow part)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from llmpipe.serve.compliance import DEMO_SCHEMA, ReplyValidator, reply_text
from llmpipe.serve.engines import EngineError, LlamaCppSpec, VllmSpec
from llmpipe.serve.traffic import TrafficError, load_prompts


def test_vllm_command_multi_lora_api_key() -> None:
    spec = VllmSpec(model="/models/base", port=9001, api_key="s3cret", served_model="base",
                    loras={"v1.1.0": "/adapters/a", "v1.0.0": "/adapters/b"}, max_lora_rank=64,
                    max_model_len=4096, gpu_memory_utilization=0.85)
    cmd = spec.command()
    assert cmd[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/models/base"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "9001"
    assert cmd[cmd.index("--api-key") + 1] == "s3cret"
    assert cmd[cmd.index("--served-model-name") + 1] == "base"
    i = cmd.index("--lora-modules")
    assert "--enable-lora" in cmd and cmd[i + 1:i + 3] == ["v1.0.0=/adapters/b", "v1.1.0=/adapters/a"]
    assert cmd[cmd.index("--max-lora-rank") + 1] == "64"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.85"
    merged = VllmSpec(model="models/merged").command()
    assert "--enable-lora" not in merged and "--api-key" not in merged


def test_llamacpp_command(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cmd = LlamaCppSpec(model=str(gguf), port=8123, api_key="k", served_model="v1", n_threads=1).command()
    assert cmd[:3] == [sys.executable, "-m", "llama_cpp.server"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--api_key") + 1] == "k" and cmd[cmd.index("--model_alias") + 1] == "v1"
    with pytest.raises(EngineError, match="GGUF model file not found"):
        LlamaCppSpec(model=str(tmp_path / "missing.gguf")).command()


def test_cli_prints_vllm_command() -> None:
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-m", "llmpipe.cli", "serve", "--engine", "vllm", "--model", "base",
                          "--lora", "v2=/ad/v2", "--print-command",
                          "--params", str(Path(__file__).resolve().parents[1] / "params.yaml")],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert "-m vllm.entrypoints.openai.api_server --model base" in out
    assert "--enable-lora --lora-modules v2=/ad/v2" in out


def test_reply_validator_rules(tmp_path: Path) -> None:
    from llmpipe.serve import compliance

    repo_schema = Path(__file__).resolve().parents[1] / "data/task/support_triage.schema.json"
    validators = [ReplyValidator(DEMO_SCHEMA)]
    if repo_schema.is_file():  # the eval stage's schema file: deploy judges replies like eval does
        validators.append(ReplyValidator.from_file(repo_schema))
        assert compliance._eval_check_format is not None
    ok = '{"intent": "refund_request", "product": "e_reader", "urgency": "high", "order_id": "KX482913"}'
    for v in validators:
        assert v.check(ok) == (True, "")
        assert v.check(' {"intent":"order_status","product":"unknown","urgency":"low","order_id":null}\n')[0]
        assert "JSON" in v.check("Sure! Here is the JSON")[1]
        assert not v.check("```json\n" + ok + "\n```")[0]
        assert "order_id" in v.check(ok.replace("KX482913", "kx48"))[1]
        assert "intent" in v.check(ok.replace("refund_request", "refund"))[1]
        assert "out of order" in v.check(
            '{"product": "e_reader", "intent": "refund_request", "urgency": "high", "order_id": null}')[1]
        assert not v.check('["a"]')[0] and not v.check(ok[:-1] + ', "extra": 1}')[0]
        assert v.check(None) == (False, "no reply text")
    # the schema file wins over the built-in rules
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "required": ["a"]}))
    assert ReplyValidator.from_file(schema).check('{"a": 1}') == (True, "")
    assert reply_text("/v1/chat/completions", {"choices": [{"message": {"content": "x"}}]}) == "x"
    assert reply_text("/v1/completions", {"choices": [{"text": "y"}]}) == "y"
    assert reply_text("/v1/completions", {"error": "x"}) is None


def test_load_prompts(tmp_path: Path) -> None:
    p = tmp_path / "test.jsonl"
    rec = {"id": "1", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                   {"role": "assistant", "content": "A"}], "metadata": {}}
    p.write_text(json.dumps(rec) + "\n\n" + json.dumps({**rec, "messages": rec["messages"][1:]}) + "\n")
    prompts = load_prompts(p, system_prompt="DEFAULT")
    assert prompts[0] == [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert prompts[1] == [{"role": "system", "content": "DEFAULT"}, {"role": "user", "content": "U"}]
    p.write_text('{"messages": [1]\n')
    with pytest.raises(TrafficError, match=r"test.jsonl:1: not a canonical record"):
        load_prompts(p)
    with pytest.raises(TrafficError, match="prompt file not found"):
        load_prompts(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------
# Router in front of a real llama.cpp engine (loopback; each test starts and stops its servers)
# ---------------------------------------------------------------------------------------------
llama_required = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python not installed (scripts/install_llama_cpp.sh)")

PROMPT = [{"role": "system", "content": "Answer with only a JSON object with the keys \"intent\", "
                                        "\"product\", \"urgency\" and \"order_id\"."},
          {"role": "user", "content": "Where is my order KX482913? My e-reader has not arrived."}]


def start_engine(tmp_path: Path, name: str, api_key: str | None = None):
    from llmpipe.serve.engines import EngineProcess, free_port
    from llmpipe.serve.rollout import gguf_path

    spec = LlamaCppSpec(model=gguf_path("embedded:smollm2-135m-instruct"), port=free_port(), api_key=api_key,
                        served_model=name, n_ctx=512, n_threads=1)
    eng = EngineProcess(spec, tmp_path / f"{name}.log", name=name).start()
    eng.wait_healthy(120)
    return eng


@pytest.mark.slow
@llama_required
def test_router_real_engine_endpoints_metrics_and_api_keys(tmp_path: Path) -> None:
    import aiohttp

    from llmpipe.serve.router import Backend, Router

    eng = start_engine(tmp_path, "stable-engine", api_key="engine-key")
    try:
        async def scenario() -> dict:
            router = Router(Backend("v1.0.0", eng.url, "stable-engine", "engine-key"), None,
                            validator=ReplyValidator(DEMO_SCHEMA), api_key="client-key")
            port = await router.start("127.0.0.1", 0)
            base = f"http://127.0.0.1:{port}"
            auth = {"Authorization": "Bearer client-key"}
            out: dict = {}
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.post(base + "/v1/chat/completions", json={"messages": PROMPT}) as r:
                        out["no_key"] = r.status
                    body = {"model": "whatever", "messages": PROMPT, "max_tokens": 8, "temperature": 0}
                    async with s.post(base + "/v1/chat/completions", json=body, headers=auth) as r:
                        out["chat"] = (r.status, r.headers.get("x-llmpipe-version"), await r.json())
                    async with s.post(base + "/v1/completions", headers=auth,
                                      json={"prompt": "The capital of France is", "max_tokens": 4}) as r:
                        out["completion"] = (r.status, await r.json())
                    async with s.post(base + "/v1/chat/completions", headers=auth,
                                      json={**body, "stream": True, "max_tokens": 4}) as r:
                        out["stream"] = (r.status, (await r.read()).decode())
                    async with s.get(base + "/v1/models", headers=auth) as r:
                        out["models"] = await r.json()
                    async with s.get(base + "/health") as r:
                        out["health"] = await r.json()
                    async with s.get(base + "/metrics") as r:
                        out["metrics"] = await r.text()
            finally:
                await router.stop()
            return out

        out = asyncio.run(scenario())
    finally:
        eng.stop()
    assert out["no_key"] == 401
    status, version, chat = out["chat"]
    assert status == 200 and version == "v1.0.0" and chat["choices"][0]["message"]["content"]
    assert out["completion"][0] == 200 and out["completion"][1]["choices"][0]["text"]
    assert out["stream"][0] == 200 and "data:" in out["stream"][1] and "[DONE]" in out["stream"][1]
    assert out["models"]["data"][0]["id"] == "llmpipe"
    assert out["health"] == {"status": "ok", "stable": "v1.0.0", "canary": None, "canary_weight": 0.0}
    m = out["metrics"]
    assert 'llmpipe_router_requests_total{outcome="ok",role="stable",version="v1.0.0"} 3.0' in m
    assert 'llmpipe_router_backend_latency_seconds_count{role="stable",version="v1.0.0"} 3.0' in m
    assert 'llmpipe_router_format_total{' in m and 'version="v1.0.0"' in m
    assert "llmpipe_router_canary_weight 0.0" in m
