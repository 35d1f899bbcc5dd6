"""GGUF round trip on a tiny random Llama model with the real SmolLM2 tokenizer.

One module-scoped run of the real `quantize` stage (llama.cpp converter -> f16 GGUF ->
llama_model_quantize Q8_0 / Q4_K_M -> load back with llama_cpp.Llama) feeds most tests. The tiny
model has hidden size 256 so k-quants (256-wide blocks) really apply, and a few training steps on
the test records so its next-token distributions are peaked: quantization error then shows up in perplexity and in
greedy tokens instead of drowning in a near-uniform softmax.

llama.cpp runs with one thread here: on a shared 2-core box its spinning thread barrier collapses
when oversubscribed (measured: 2 threads 2-19 tok/s vs 1 thread ~900 tok/s under load).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

# No importorskip: a missing llama-cpp-python (scripts/install_llama_cpp.sh) must fail CI, not skip.
import llama_cpp  # noqa: E402,F401

import yaml  # noqa: E402

from llmpipe.config import ParamsError, load_params, read_yaml  # noqa: E402
from llmpipe.export import gguf as G  # noqa: E402

from stage_loader import load_stage

ROOT = Path(__file__).resolve().parents[1]
QUANTIZE = {"name": "tiny", "types": ["Q8_0", "q4_k_m"], "n_threads": 1, "n_ctx": 256,
            "ppl_max_examples": 6, "reply_max_tokens": 8, "bench_tokens": 16}

TRAIN_STEPS = 12
SYSTEM = ("You are a support triage assistant. Read the customer's message and answer with only a "
          "JSON object with the keys \"intent\", \"product\", \"urgency\" and \"order_id\".")
USERS = [
    ("Where is my order KX482913? It was due Monday.", '{"intent": "order_status", "product": "unknown", "urgency": "medium", "order_id": "KX482913"}'),
    ("My robot vacuum stopped charging!! Need help asap", '{"intent": "technical_issue", "product": "robot_vacuum", "urgency": "high", "order_id": null}'),
    ("I'd like a refund for the coffee maker (order AB123456), it leaks.", '{"intent": "refund_request", "product": "coffee_maker", "urgency": "medium", "order_id": "AB123456"}'),
    ("Can I change the shipping address? Café Straße 5, München 🙂", '{"intent": "shipping_address_change", "product": "unknown", "urgency": "low", "order_id": null}'),
    ("Does the e-reader support PDF files?\n\tThanks", '{"intent": "product_inquiry", "product": "e_reader", "urgency": "low", "order_id": null}'),
    ("I was billed twice for my fitness tracker, order ZZ000001", '{"intent": "billing_question", "product": "fitness_tracker", "urgency": "high", "order_id": "ZZ000001"}'),
]


def _records():
    for i, (user, reply) in enumerate(USERS):
        yield {
            "id": f"{i:016x}",
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                         {"role": "assistant", "content": reply}],
            "metadata": {"intent": json.loads(reply)["intent"]},
            "source": {"file": "tests/test_quantize.py", "line": i + 1, "format": "messages"},
        }


def train_tiny_llama(out: Path, *, hidden: int, steps: int = TRAIN_STEPS) -> Path:
    """A 2-layer Llama (``hidden`` wide, SmolLM2's tokenizer and chat template) briefly trained
    on the test records, saved to ``out`` like models/merged.

    Training (a few seconds) makes its predictions meaningful: perplexity far below the
    vocabulary size, and a greedy reply that is the memorised JSON.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmpipe.model.source import load_tokenizer

    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    assert tok.chat_template, "SmolLM2 tokenizer lost its chat template"
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = LlamaForCausalLM(cfg)
    seqs = [G.hf_token_ids(tok, G.chat_text(tok, r["messages"])) for r in _records()]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _step in range(steps):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, hidden-256 Llama trained on the test records, so the GGUF files can be checked
    to reproduce its greedy reply."""
    return train_tiny_llama(tmp_path_factory.mktemp("merged"), hidden=256)


def _params(path: Path, **quantize) -> Path:
    """The repository's params.yaml with a small ``quantize:`` section (the stage validates the whole file)."""
    data = read_yaml(ROOT / "params.yaml")
    data["quantize"] = {**QUANTIZE, **quantize}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _run_stage(work: Path, model: Path, test: Path, params: Path, out: Path, metrics: Path) -> int:
    """Run stages/quantize.py; its timings/quantize.json goes under ``work``."""
    return load_stage("quantize").main(["--params", str(params), "--model", str(model), "--test", str(test),
                                        "--out", str(out), "--metrics", str(metrics), "--timings-root", str(work)])


@pytest.fixture(scope="module")
def stage_run(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("quantize")
    test = work / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    params = _params(work / "params.yaml")
    out, metrics = work / "gguf", work / "quantize.json"
    assert _run_stage(work, tiny_model, test, params, out, metrics) == 0
    return {"out": out, "metrics": json.loads(metrics.read_text()), "params": params, "test": test, "work": work,
            "timings": json.loads((work / "timings/quantize.json").read_text())}


def test_stage_writes_all_files_and_metrics(stage_run):
    out, m = stage_run["out"], stage_run["metrics"]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "tiny-f16.gguf", "tiny-q4_k_m.gguf", "tiny-q8_0.gguf"]
    assert set(m["gguf"]) == {"f16", "q8_0", "q4_k_m"}
    sizes = {k: v["size_bytes"] for k, v in m["gguf"].items()}
    for k, v in m["gguf"].items():
        assert sizes[k] == (out / v["file"]).stat().st_size
        assert math.isfinite(v["ppl"]) and v["ppl"] > 1
        assert v["tokenizer_mismatches"] == 0 and v["n_params"] > 13_000_000
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]
    bpw = {k: v["bits_per_weight"] for k, v in m["gguf"].items()}  # whole file incl. vocab metadata
    assert bpw["q4_k_m"] < bpw["q8_0"] < bpw["f16"] and bpw["f16"] >= 16
    assert m["ppl_examples"] == 6 and m["ppl_truncated"] == 0 and m["tokenizer_roundtrip_ok"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["q8_0"]["file"] == "tiny-q8_0.gguf"
    assert all(isinstance(f["reply"], str) for f in manifest["files"].values())
    assert manifest["prompt"][-1]["role"] == "user"


def test_timings_are_kept_out_of_metrics_and_outputs(stage_run):
    """Speed numbers go to timings/quantize.json; metrics and manifest hold results only."""
    t = stage_run["timings"]
    assert set(t["gguf"]) == {"f16", "q8_0", "q4_k_m"}
    for v in t["gguf"].values():
        assert v["tokens_per_s"] > 0 and v["prompt_tokens_per_s"] > 0 and v["bench_tokens"] == 15
        assert v["create_seconds"] >= 0 and v["load_seconds"] > 0 and v["eval_seconds"] > 0
    assert t["seconds"] > 0 and t["merged"]["seconds"] > 0 and t["n_threads"] == 1

    def keys(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield k
                yield from keys(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from keys(v)

    manifest = json.loads((stage_run["out"] / "manifest.json").read_text())
    for doc in (stage_run["metrics"], manifest):
        timing_keys = [k for k in keys(doc) if "second" in k or "per_s" in k or "timing" in k]
        assert timing_keys == []


def test_rerun_gives_identical_outputs_and_metrics(stage_run, tiny_model, tmp_path):
    """A second run on the same inputs writes byte-identical GGUFs, manifest and metrics."""
    out, metrics = tmp_path / "gguf", tmp_path / "quantize.json"
    assert _run_stage(tmp_path, tiny_model, stage_run["test"], stage_run["params"], out, metrics) == 0
    first = stage_run["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in first.iterdir())
    for p in first.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert json.loads(metrics.read_text()) == stage_run["metrics"]


def test_quality_cost_is_measured_against_merged(stage_run):
    m = stage_run["metrics"]
    base = m["merged"]["ppl"]
    assert math.isfinite(base) and 1 < base < 49152  # peaked, not a uniform softmax over the vocab
    g = m["gguf"]
    assert g["f16"]["ppl"] == pytest.approx(base, rel=5e-3)   # f16 conversion: essentially lossless
    assert g["q8_0"]["ppl"] == pytest.approx(base, rel=2e-2)  # Q8_0: close to the HF model
    assert g["q8_0"]["ppl_delta"] == pytest.approx(g["q8_0"]["ppl"] - base)
    assert abs(g["q4_k_m"]["ppl_delta_pct"]) < 50


def test_logit_error_grows_as_bits_shrink(stage_run, tiny_model):
    """Per-position logits of each GGUF vs transformers: error f16 < Q8_0 < Q4_K_M, all small."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = G.hf_token_ids(tok, G.chat_text(tok, list(_records())[2]["messages"]))
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0].numpy().astype(np.float64)
    rel_err = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        llm = G.load_gguf(stage_run["out"] / f"tiny-{quant}.gguf", n_ctx=256, n_threads=1)
        try:
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        finally:
            llm.close()
        rel_err[quant] = float(np.sqrt(((got - ref) ** 2).mean()) / ref.std())
    assert rel_err["f16"] < rel_err["q8_0"] < rel_err["q4_k_m"] < 0.2, rel_err
    assert rel_err["f16"] < 0.01 and rel_err["q8_0"] < 0.05, rel_err


def test_quantized_files_really_hold_quantized_tensors(stage_run):
    out = stage_run["out"]
    f16 = G.read_gguf_info(out / "tiny-f16.gguf")
    q8 = G.read_gguf_info(out / "tiny-q8_0.gguf")
    q4 = G.read_gguf_info(out / "tiny-q4_k_m.gguf")
    assert f16.architecture == "llama" and f16.has_chat_template
    assert f16.file_type == "MOSTLY_F16" and "F16" in f16.tensor_types
    assert q8.file_type == "MOSTLY_Q8_0" and "Q8_0" in q8.tensor_types and "F16" not in q8.tensor_types
    assert q4.file_type == "MOSTLY_Q4_K_M" and "Q4_K" in q4.tensor_types
    assert f16.n_elements == q8.n_elements == q4.n_elements


def test_tokenizer_round_trip_hf_vs_llama_cpp(stage_run, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    llm = G.load_gguf(stage_run["out"] / "tiny-q8_0.gguf", n_ctx=256, n_threads=1)
    try:
        for rec in _records():
            for gen_prompt, msgs in ((False, rec["messages"]), (True, rec["messages"][:-1])):
                text = G.chat_text(tok, msgs, add_generation_prompt=gen_prompt)
                ids = G.hf_token_ids(tok, text)
                assert G.llama_tokenize(llm, text) == ids, text
                assert "<|im_start|>" in text and ids.count(tok.convert_tokens_to_ids("<|im_start|>")) >= 2
    finally:
        llm.close()


def test_f16_gguf_matches_transformers_logits_and_greedy_tokens(stage_run, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    msgs = list(_records())[1]["messages"][:-1]
    ids = G.hf_token_ids(tok, G.chat_text(tok, msgs, add_generation_prompt=True))
    with torch.inference_mode():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()
        hf_greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                   min_new_tokens=8, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    llm = G.load_gguf(stage_run["out"] / "tiny-f16.gguf", n_ctx=256, n_threads=1)
    try:
        llm.reset()
        llm.eval(ids)
        cpp_logits = np.asarray(llm.scores[: len(ids)])
        assert np.corrcoef(cpp_logits.ravel(), hf_logits.ravel())[0, 1] > 0.999
        assert (cpp_logits.argmax(1) == hf_logits.argmax(1)).mean() >= 0.95
        llm.reset()
        cpp_greedy = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            cpp_greedy.append(t)
            if len(cpp_greedy) == 8:
                break
    finally:
        llm.close()
    assert cpp_greedy == hf_greedy


def test_chat_reply_and_generation_speed(stage_run):
    llm = G.load_gguf(stage_run["out"] / "tiny-q4_k_m.gguf", n_ctx=256, n_threads=1)
    try:
        msgs = list(_records())[0]["messages"][:-1]
        reply = G.chat_reply(llm, msgs, max_tokens=8)
        assert isinstance(reply, str)
        stats = G.measure_generation(llm, llm.tokenize(b"Hello there", add_bos=False), n_tokens=12)
        assert stats.generated_tokens == 11 and stats.tokens_per_s > 0
        with pytest.raises(G.GGUFError, match="exceed n_ctx"):
            G.measure_generation(llm, [1] * 250, n_tokens=12)
    finally:
        llm.close()


def test_nll_matches_torch_cross_entropy():
    import torch

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(7, 50)).astype(np.float32)
    ids = rng.integers(0, 50, size=7).tolist()
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:-1]), torch.tensor(ids[1:]), reduction="sum")
    assert G._nll_from_logits(logits, ids) == pytest.approx(float(ref), rel=1e-5)
    p = G.Perplexity(nll_sum=float(ref), n_tokens=6, n_sequences=1)
    assert p.ppl == pytest.approx(math.exp(float(ref) / 6))


def test_clear_errors(tmp_path, tiny_model, stage_run):
    with pytest.raises(G.GGUFError, match="unknown quant type 'Q9_9'.*Q4_K_M"):
        G.normalise_quant_type("Q9_9")
    assert G.normalise_quant_type(" q4_k_m ") == "Q4_K_M"
    with pytest.raises(G.GGUFError, match="no config.json"):
        G.convert_to_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(G.GGUFError, match="not found"):
        G.quantize(tmp_path / "missing.gguf", tmp_path / "y.gguf", "Q8_0", 1)
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(G.GGUFError, match="bogus.gguf"):
        G.load_gguf(bogus, n_ctx=256, n_threads=1)
    with pytest.raises(G.GGUFError, match="bogus.gguf"):
        G.quantize(bogus, tmp_path / "z.gguf", "Q8_0", 1)
    assert not (tmp_path / "z.gguf").exists() and not list(tmp_path.glob(".z.gguf*"))

    # stage: bad params and missing inputs fail with exit 2 and leave no output behind
    out, m = tmp_path / "gguf", tmp_path / "m.json"
    for bad in ({"types": ["Q8_0", "NOPE"]}, {"types": []}, {"types": ["q8_0", "f16"]}, {"name": "a/b"},
                {"n_threads": 0}):
        params = _params(tmp_path / "bad.yaml", **bad)
        assert _run_stage(tmp_path, tiny_model, stage_run["test"], params, out, m) == 2, bad
    assert _run_stage(tmp_path, tiny_model, tmp_path / "missing.jsonl", stage_run["params"], out, m) == 2
    assert not out.exists() and not m.exists() and not (tmp_path / "timings").exists()


def test_quantize_params_are_typed(tmp_path):
    cfg = load_params(ROOT / "params.yaml").quantize
    assert cfg.types == ["Q8_0", "Q4_K_M"] and cfg.name == "support-triage"
    with pytest.raises(ParamsError, match=r"quantize.types: .*F16 is always written"):
        load_params(_params(tmp_path / "p.yaml", types=["Q8_0", "F16"]))
    with pytest.raises(ParamsError, match=r"quantize.bench_tokns: unknown key \(did you mean 'quantize.bench_tokens'"):
        load_params(_params(tmp_path / "p.yaml", bench_tokns=8))
    with pytest.raises(ParamsError, match=r"quantize.n_ctx: required key is missing"):
        data = read_yaml(ROOT / "params.yaml")
        del data["quantize"]["n_ctx"]
        (tmp_path / "q.yaml").write_text(yaml.safe_dump(data))
        load_params(tmp_path / "q.yaml")
