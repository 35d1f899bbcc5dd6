"""AWQ (W4A16) with llm-compressor: the quantize-awq stage (issue 13).

Fast: the ``quantize_awq`` section (misspelled keys, bounds), the AWQ interpreter and worker
command, the request made from the records (calibration and perplexity ids = the quantize stage's),
and the disabled stage (only a marker, no AWQ venv needed) run as a real stage script.

Real: the stage script runs llm-compressor's AWQ in ``.venv-awq`` (``make setup-awq``) on a
2-layer Llama (hidden 128, a multiple of the group size 64) briefly trained on the records, with
the real SmolLM2 tokenizer; the checkpoint is compressed-tensors ``pack-quantized`` (int4 packed
weights, a scale and zero point per 64 weights), loaded back and scored. Without ``.venv-awq``
these tests are skipped, unless ``LLMPIPE_REQUIRE_AWQ=1`` (then they fail).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from stage_loader import load_stage
from test_quantize import _records, train_tiny_llama  # the quantize tests' chats and tiny model

from llmpipe.config import ParamsError, load_params, load_stage_params, read_yaml
from llmpipe.config.export import QuantizeAwqSection
from llmpipe.export import awq as A
from llmpipe.export import gguf as G

ROOT = Path(__file__).resolve().parents[1]
AWQ_PYTHON = ROOT / ".venv-awq" / "bin" / "python"
AWQ = {"enabled": True, "python": ".venv-awq/bin/python", "group_size": 64, "symmetric": False,
       "calibration_samples": 4, "max_seq_length": 64, "n_grid": 4, "ignore": ["lm_head"],
       "dtype": "bfloat16"}
QUANTIZE_PPL = {"n_ctx": 256, "ppl_max_examples": 6, "n_threads": 1, "reply_max_tokens": 8}


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _params(path: Path, **awq) -> Path:
    data = read_yaml(ROOT / "params.yaml")
    data["quantize_awq"] = {**AWQ, **awq}
    data["quantize"].update(QUANTIZE_PPL)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _tokenizer():
    from llmpipe.model.source import load_tokenizer

    return load_tokenizer("embedded:smollm2-135m-instruct")


def _run_stage(work: Path, model: Path, params: Path, out: Path) -> int:
    train = _write_jsonl(work / "train.jsonl", _records())
    test = _write_jsonl(work / "test.jsonl", _records())
    return load_stage("quantize_awq").main([
        "--params", str(params), "--model", str(model), "--train", str(train), "--test", str(test),
        "--out", str(out), "--metrics", str(work / "quantize_awq.json"), "--timings-root", str(work)])


# ----------------------------------------------------------------------------- config, command


def test_committed_defaults_leave_awq_off():
    p = load_params(ROOT / "params.yaml").quantize_awq
    assert p.enabled is False
    assert p.python == ".venv-awq/bin/python"
    assert 576 % p.group_size == 0 and 1536 % p.group_size == 0   # SmolLM2-135M's layer widths


@pytest.mark.parametrize("key, value, message", [
    ("group_sise", 64, "did you mean 'quantize_awq.group_size'"),
    ("group_size", 0, "quantize_awq.group_size"),
    ("calibration_samples", 0, "quantize_awq.calibration_samples"),
    ("python", "", "quantize_awq.python"),
])
def test_bad_keys_are_errors(tmp_path, key, value, message):
    data = read_yaml(ROOT / "params.yaml")
    data["quantize_awq"][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ParamsError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_params(tmp_path / "params.yaml")


def test_stage_reads_only_declared_quantize_keys():
    stage = load_stage("quantize_awq")
    cfg = load_stage_params(stage.PARAMS, ROOT / "params.yaml")
    assert cfg.quantize.ppl_max_examples >= 1
    with pytest.raises(ParamsError, match="quantize.types"):
        _ = cfg.quantize.types   # the GGUF list is not this stage's business: not declared


def test_missing_interpreter_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(A.PYTHON_ENV, raising=False)
    cfg = QuantizeAwqSection(**{**AWQ, "python": "no-such-venv/bin/python"})
    with pytest.raises(A.AwqError, match="make setup-awq"):
        A.awq_python(cfg, root=tmp_path)
    monkeypatch.setenv(A.PYTHON_ENV, str(tmp_path / "nope"))
    with pytest.raises(A.AwqError, match=r"\$LLMPIPE_AWQ_PYTHON"):
        A.awq_python(cfg, root=tmp_path)


def test_interpreter_is_resolved_from_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv(A.PYTHON_ENV, raising=False)
    py = tmp_path / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("")
    cfg = QuantizeAwqSection(**{**AWQ, "python": "venv/bin/python"})
    assert A.awq_python(cfg, root=tmp_path) == py
    cmd = A.worker_command(py, "req.json", "res.json")
    assert cmd == [str(py), str(ROOT / "src/llmpipe/export/awq_worker.py"), "req.json", "res.json"]
    env = A.worker_env(1)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT / "src")
    assert env["OMP_NUM_THREADS"] == "1" and env["HF_HUB_OFFLINE"] == "1"


def test_request_uses_the_quantize_stage_perplexity_ids(tmp_path):
    tok = _tokenizer()
    records = list(_records())
    cfg = QuantizeAwqSection(**{**AWQ, "calibration_samples": 3, "max_seq_length": 40})
    req = A.worker_request(cfg, tok, tmp_path / "m", tmp_path / "o", records, records, ppl_max_examples=5,
                           n_ctx=60, n_threads=1, reply_max_tokens=8)
    same = G.perplexity_sequences(tok, records, 5, 60)
    assert req["ppl_ids"] == same.seqs and req["ppl_truncated"] == same.truncated
    assert len(req["calibration_ids"]) == 3
    assert all(len(s) <= 40 for s in req["calibration_ids"])
    assert req["calibration_ids"][0] == G.hf_token_ids(tok, G.chat_text(tok, records[0]["messages"]))[:40]
    assert tok.decode(req["prompt_ids"]).rstrip().endswith("assistant")   # generation prompt, no reply
    assert (req["group_size"], req["symmetric"], req["ignore"]) == (64, False, ["lm_head"])
    with pytest.raises(A.AwqError, match="train split has 6 records"):
        A.worker_request(QuantizeAwqSection(**{**AWQ, "calibration_samples": 7}), tok, tmp_path, tmp_path,
                         records, records, ppl_max_examples=5, n_ctx=60, n_threads=1, reply_max_tokens=8)


def test_disabled_stage_writes_only_a_marker(tmp_path, monkeypatch):
    """The default pipeline: no AWQ venv, no model needed; a DVC out and a metrics file anyway."""
    monkeypatch.setenv(A.PYTHON_ENV, str(tmp_path / "no-venv-here"))
    out = tmp_path / "awq"
    assert _run_stage(tmp_path, tmp_path / "no-model", _params(tmp_path / "params.yaml", enabled=False), out) == 0
    assert [p.name for p in out.iterdir()] == ["awq.json"]
    assert json.loads((out / "awq.json").read_text())["enabled"] is False
    assert json.loads((tmp_path / "quantize_awq.json").read_text()) == {"enabled": False}


def test_enabled_without_venv_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(A.PYTHON_ENV, str(tmp_path / "no-venv-here"))
    out = tmp_path / "awq"
    assert _run_stage(tmp_path, tmp_path / "no-model", _params(tmp_path / "params.yaml"), out) == 2
    assert "make setup-awq" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- real AWQ


def _require_awq():
    if os.environ.get(A.PYTHON_ENV):
        return
    if not AWQ_PYTHON.is_file():
        if os.environ.get("LLMPIPE_REQUIRE_AWQ") == "1":
            pytest.fail(f"LLMPIPE_REQUIRE_AWQ=1 but {AWQ_PYTHON} is missing: run `make setup-awq`")
        pytest.skip(f"{AWQ_PYTHON} missing: run `make setup-awq` (LLMPIPE_REQUIRE_AWQ=1 makes this fail)")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama, hidden 128 (two groups of 64), briefly trained on the records so that its
    perplexity is far below the vocabulary size and 4-bit rounding shows up in it."""
    return train_tiny_llama(tmp_path_factory.mktemp("merged"), hidden=128)


@pytest.fixture(scope="module")
def awq_run(tiny_model, tmp_path_factory):
    _require_awq()
    work = tmp_path_factory.mktemp("awq")
    out = work / "awq"
    assert _run_stage(work, tiny_model, _params(work / "params.yaml"), out) == 0
    return {"out": out, "metrics": json.loads((work / "quantize_awq.json").read_text()),
            "timings": json.loads((work / "timings/quantize_awq.json").read_text()), "merged": tiny_model}


def test_awq_checkpoint_is_packed_int4_with_groups_of_64(awq_run):
    import torch
    from safetensors import safe_open

    out = awq_run["out"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == (4, "group", 64, False)
    assert qc["ignore"] == ["lm_head"]
    assert (out / "tokenizer.json").is_file() and json.loads((out / "tokenizer_config.json").read_text()).get(
        "chat_template") or (out / "chat_template.jinja").is_file()
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        keys = set(f.keys())
        q = "model.layers.0.self_attn.q_proj"
        packed, scale = f.get_tensor(f"{q}.weight_packed"), f.get_tensor(f"{q}.weight_scale")
        embed = f.get_tensor("model.embed_tokens.weight")
    assert f"{q}.weight" not in keys and f"{q}.weight_zero_point" in keys
    assert tuple(packed.shape) == (128, 128 // 8)   # eight 4-bit values per int32
    assert tuple(scale.shape) == (128, 128 // 64)   # one scale per group of 64 inputs
    assert scale.dtype == torch.bfloat16 and embed.dtype == torch.bfloat16   # quantize_awq.dtype
    manifest = json.loads((out / "awq.json").read_text())
    assert manifest["enabled"] and set(manifest["files"]) == {p.name for p in out.iterdir() if p.name != "awq.json"}


def test_awq_perplexity_against_merged(awq_run):
    m = awq_run["metrics"]
    assert m["enabled"] and m["scheme"] == "W4A16" and m["format"] == "pack-quantized"
    assert m["ppl_examples"] == 6 and m["calibration_samples"] == 4
    # the merged model, scored by the worker, is the quantize stage's reference on the same ids
    import torch
    from transformers import AutoModelForCausalLM

    tok = _tokenizer()
    seqs = G.perplexity_sequences(tok, list(_records()), 6, 256).seqs
    ref = G.perplexity_hf(AutoModelForCausalLM.from_pretrained(awq_run["merged"], dtype=torch.float32), seqs)
    assert m["merged_ppl"] == pytest.approx(ref.ppl, rel=1e-4)
    assert m["ppl_tokens"] == ref.n_tokens
    # the trained model is far from uniform (vocabulary 49152), and 4-bit weights keep it so
    assert m["merged_ppl"] < 1000
    assert m["ppl"] != m["merged_ppl"]
    assert m["ppl"] < 1.5 * m["merged_ppl"]
    assert m["size_ratio_vs_merged"] < 1.0
    assert m["ppl_delta_pct"] == pytest.approx(100 * (m["ppl"] - m["merged_ppl"]) / m["merged_ppl"])
    assert "seconds" in awq_run["timings"] and "seconds" not in m   # timings stay out of metrics
