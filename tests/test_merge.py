"""merge: merged model == base + adapter (logits), standalone, through the stage code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmpipe.io import write_jsonl

from stage_loader import load_stage


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """Tiny random Llama + a LoRA adapter with random (non-zero) A and B on all linear layers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmpipe.model.base import fix_pad_token
    from llmpipe.model.source import load_tokenizer

    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    fix_pad_token(tok)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    root = tmp_path_factory.mktemp("merge")
    base_dir, adapter_dir = root / "base", root / "adapter"
    LlamaForCausalLM(cfg).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    peft_model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    def msgs(i: int) -> list[dict]:
        return [{"role": "system", "content": "Triage."},
                {"role": "user", "content": f"Where is order KX00000{i}?"},
                {"role": "assistant", "content": '{"intent":"order_status"}'}]

    write_jsonl(root / "val.jsonl", [{"id": str(i), "messages": msgs(i)} for i in range(3)])
    return root, tok


ROOT = Path(__file__).resolve().parents[1]


def _write_params(path: Path, **merge) -> Path:
    """The repository's params.yaml (every key: no defaults in code) with ``merge`` overrides."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["max_seq_len"] = 256
    params["merge"].update(merge)
    path.write_text(yaml.safe_dump(params))
    return path


def _run(root: Path, dtype: str, tolerance: float = 1e-3):
    _write_params(root / f"params_{dtype}.yaml", dtype=dtype, verify_examples=2, tolerance=tolerance)
    return load_stage("merge").main([
        "--params", str(root / f"params_{dtype}.yaml"), "--base", str(root / "base"),
        "--adapter", str(root / "adapter"), "--val", str(root / "val.jsonl"),
        "--out", str(root / f"merged_{dtype}"), "--metrics", str(root / f"merge_{dtype}.json"),
        "--timings-root", str(root / f"timings_{dtype}")])


def test_merged_model_matches_adapter_model(base_and_adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, tok = base_and_adapter
    assert _run(root, "float32") == 0
    m = json.loads((root / "merge_float32.json").read_text())
    assert m["max_abs_logit_diff"] <= 1e-3 and m["verified_examples"] == 2 and m["weights_sha256"]
    assert "seconds" not in m                      # timings/merge.json, not a metric
    assert json.loads((root / "timings_float32" / "timings" / "merge.json").read_text())["seconds"] > 0

    merged_dir = root / "merged_float32"
    assert not (merged_dir / "adapter_config.json").exists()         # standalone, no peft needed
    assert (merged_dir / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (merged_dir / "tokenizer_config.json").read_text())
    x = tok("Where is my order KX123456?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(input_ids=x).logits
        base = AutoModelForCausalLM.from_pretrained(root / "base")
        plain = base(input_ids=x).logits
        adapted = PeftModel.from_pretrained(base, str(root / "adapter"))(input_ids=x).logits
    # Independent check on a prompt the stage did not see: merged == base + adapter ...
    assert float((merged - adapted).abs().max()) <= 1e-3
    # ... and the adapter really changes the model (so the check above is not vacuous).
    assert float((plain - adapted).abs().max()) > 1e-2


def test_bf16_merge_saves_bf16_and_reports_cast_error(base_and_adapter):
    import torch
    from safetensors.torch import load_file

    root, _ = base_and_adapter
    assert _run(root, "bfloat16") == 0
    m = json.loads((root / "merge_bfloat16.json").read_text())
    assert m["dtype"] == "bfloat16" and m["max_abs_logit_diff"] <= 1e-3
    assert m["max_abs_logit_diff_saved"] >= m["max_abs_logit_diff"]
    weights = load_file(str(root / "merged_bfloat16" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_merge_fails_clearly_without_adapter(base_and_adapter, tmp_path, capsys):
    root, _ = base_and_adapter
    _write_params(tmp_path / "p.yaml")
    rc = load_stage("merge").main(["--params", str(tmp_path / "p.yaml"), "--base", str(root / "base"),
                                    "--adapter", str(tmp_path / "nope"), "--val", str(root / "val.jsonl"),
                                    "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"),
                                    "--timings-root", str(tmp_path)])
    assert rc == 2 and "adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
