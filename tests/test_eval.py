"""Tests for llmpipe.evaluate (scorers, schema, few-shot, generation, lm-eval tasks, safety, judge)
and the eval-base / eval stages on a tiny random Llama saved with the SmolLM2 tokenizer."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmpipe.evaluate import fewshot, generation, harness, judge, safety, scorers
import yaml

from llmpipe.config import ParamsError, load_params, read_yaml
from llmpipe.evaluate.compare import CompareError, compare
from llmpipe.evaluate.records import RecordError, load_records
from llmpipe.evaluate.run import run_eval

from stage_loader import load_stage

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "data/task/support_triage.schema.json"
TASK_DIR = ROOT / "data/eval/lm_eval"
SAFETY = ROOT / "data/eval/safety/harmful_requests.jsonl"
SYSTEM = ("You are a support triage assistant. Read the customer's message and answer with only a JSON "
          "object with the keys \"intent\", \"product\", \"urgency\" and \"order_id\".")
GOOD = '{"intent": "refund_request", "product": "coffee_maker", "urgency": "high", "order_id": "KX482913"}'


@pytest.fixture(scope="module")
def validator():
    return scorers.load_schema(SCHEMA)


# ---------------------------------------------------------------- schema + scorers

def test_schema_accepts_every_demo_reply_and_rejects_bad_ones(validator):
    from llmpipe.demo import support as demo

    labels = [
        {"intent": "order_status", "product": "unknown", "urgency": "low", "order_id": None},
        {"intent": "shipping_address_change", "product": "e_reader", "urgency": "medium", "order_id": "AB123456"},
    ]
    for lab in labels:
        assert scorers.check_format(demo.reply_json(lab), validator).compliant
    bad = [
        '{"intent": "refund", "product": "unknown", "urgency": "low", "order_id": null}',          # enum
        '{"intent": "order_status", "product": "unknown", "urgency": "low", "order_id": "kx12"}',  # pattern
        '{"intent": "order_status", "product": "unknown", "urgency": "low"}',                      # missing key
        '{"intent": "order_status", "product": "unknown", "urgency": "low", "order_id": null, "x": 1}',
        '{"intent": "order_status", "product": "unknown", "urgency": "LOW", "order_id": null}',
        '["order_status"]',
    ]
    for text in bad:
        res = scorers.check_format(text, validator)
        assert res.valid_json and not res.schema_valid and not res.compliant and res.errors, text


def test_schema_matches_bundled_raw_replies(validator):
    """Every well-formed reference reply in the bundled demo data is schema-valid and ordered."""
    path = ROOT / "data/raw/support_chat.jsonl"
    if not path.is_file():
        pytest.skip("bundled demo data not generated")
    n = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            reply = rec["messages"][-1]["content"]
            json.loads(reply)
        except (ValueError, KeyError, TypeError, IndexError):
            continue  # the demo plants invalid records for validate
        res = scorers.check_format(reply, validator)
        assert res.compliant, (reply, res.errors)
        n += 1
    assert n > 100


def test_load_schema_errors(tmp_path):
    with pytest.raises(scorers.SchemaError, match="not found"):
        scorers.load_schema(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": }')
    with pytest.raises(scorers.SchemaError, match=r"bad.json:1:"):
        scorers.load_schema(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"type": 12}')
    with pytest.raises(scorers.SchemaError, match="not a valid JSON Schema"):
        scorers.load_schema(wrong)


def test_format_is_strict_but_accuracy_is_lenient(validator):
    fenced = f"```json\n{GOOD}\n```"
    s = scorers.score_example(fenced, GOOD, ["intent", "product", "urgency", "order_id"], validator)
    assert not s["format_compliant"] and not s["valid_json"]
    assert s["parsed"] and s["exact_match"]
    reordered = '{"product": "coffee_maker", "intent": "refund_request", "urgency": "high", "order_id": "KX482913"}'
    r = scorers.check_format(reordered, validator)
    assert r.schema_valid and not r.key_order_ok and not r.compliant
    assert any("out of order" in e for e in r.errors)
    assert scorers.check_format(reordered, validator, require_key_order=False).compliant
    assert scorers.check_format("  " + GOOD + "\n", validator).compliant


def test_field_exact_match_is_type_sensitive(validator):
    fields = ["intent", "product", "urgency", "order_id"]
    ref = '{"intent": "order_status", "product": "unknown", "urgency": "low", "order_id": null}'
    pred = '{"intent": "order_status", "product": "e_reader", "urgency": "low", "order_id": "null"}'
    s = scorers.score_example(pred, ref, fields, validator)
    assert s["field_match"] == {"intent": True, "product": False, "urgency": True, "order_id": False}
    assert not s["exact_match"] and not s["format_compliant"]  # "null" breaks the pattern
    s2 = scorers.score_example("I think it is an order status question.", ref, fields, validator)
    assert not s2["parsed"] and not any(s2["field_match"].values())
    agg = scorers.aggregate([s, s2, scorers.score_example(ref, ref, fields, validator)], fields)
    assert agg["n"] == 3
    assert agg["field_accuracy"]["intent"] == pytest.approx(2 / 3)
    assert agg["field_accuracy"]["product"] == pytest.approx(1 / 3)
    assert agg["task_accuracy"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3 + 1 / 3) / 4)
    assert agg["exact_match"] == pytest.approx(1 / 3)
    assert agg["format_compliance"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no examples"):
        scorers.aggregate([], fields)


def test_extract_json_object_skips_broken_braces():
    assert scorers.extract_json_object('x {broken {"a": 1} tail') == {"a": 1}
    assert scorers.extract_json_object("no json here") is None
    assert scorers.extract_json_object("[1, 2]") is None


# ---------------------------------------------------------------- records + few-shot

def _record(i: int, intent: str, reply: str = GOOD, user: str | None = None) -> dict:
    return {
        "id": f"{i:016x}",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user or f"Message {i} about my order ({intent})."},
            {"role": "assistant", "content": reply},
        ],
        "metadata": {"intent": intent},
        "source": {"file": "t", "line": i, "format": "messages"},
    }


def test_fewshot_skips_records_without_the_stratify_key():
    """Safety examples pinned to train carry no intent: they are never task demonstrations."""
    intents = ["order_status", "refund_request"]
    task = [_record(i, intents[i % 2]) for i in range(6)]
    safety_recs = []
    for i in range(30):
        rec = _record(100 + i, "x", reply="I'm sorry, but I can't help with that.")
        rec["metadata"] = {"purpose": "safety", "kind": "refusal", "split": "train"}
        safety_recs.append(rec)
    chosen = fewshot.select_examples(task + safety_recs, 6, seed=3)
    assert sorted(r["id"] for r in chosen) == sorted(r["id"] for r in task)
    with pytest.raises(ValueError, match="metadata.intent"):
        fewshot.select_examples(task + safety_recs, 7, seed=3)


def test_fewshot_selection_is_deterministic_and_covers_strata():
    intents = ["order_status", "refund_request", "cancel_order", "technical_issue"]
    train = [_record(i, intents[i % 4]) for i in range(40)]
    a = fewshot.select_examples(train, 4, seed=7)
    b = fewshot.select_examples(list(reversed(train)), 4, seed=7)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert {r["metadata"]["intent"] for r in a} == set(intents)
    assert fewshot.select_examples(train, 0, seed=7) == []
    with pytest.raises(ValueError, match="k=50"):
        fewshot.select_examples(train, 50, seed=7)
    msgs = fewshot.fewshot_prompt(_record(99, "cancel_order"), a[:2])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == GOOD and msgs[-1]["content"].startswith("Message 99")


def test_load_records_errors(tmp_path):
    p = tmp_path / "t.jsonl"
    rec = _record(1, "order_status")
    rec["messages"] = rec["messages"][:2]
    p.write_text(json.dumps(_record(0, "x")) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(RecordError, match=r"t.jsonl:2: record has no final assistant"):
        load_records(p)
    assert len(load_records(p, limit=1)) == 1
    with pytest.raises(RecordError, match="not found"):
        load_records(tmp_path / "missing.jsonl")


def _params_with_eval(path: Path, **over) -> Path:
    """The repository's params.yaml with ``eval.<dotted key>`` values replaced (None deletes the key)."""
    data = read_yaml(ROOT / "params.yaml")
    for dotted, value in over.items():
        *parents, leaf = dotted.split("__")
        cur = data["eval"]
        for k in parents:
            cur = cur[k]
        if value is None:
            del cur[leaf]
        else:
            cur[leaf] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_eval_params_section_parses(tmp_path):
    cfg = load_params(ROOT / "params.yaml").eval
    assert cfg.fields == ["intent", "product", "urgency", "order_id"]
    assert set(cfg.lm_eval.tasks) == {"llmpipe_general_mc", "llmpipe_general_gen"}
    assert not cfg.judge.enabled and cfg.schema_ == "data/task/support_triage.schema.json"
    for over, message in [
        ({"fields": []}, r"eval.fields: List should have at least 1 item"),
        ({"max_new_tokens": None}, r"eval.max_new_tokens: required key is missing"),
        ({"lm_eval__tasks": {}}, r"eval.lm_eval.tasks: Dictionary should have at least 1 item"),
        ({"fewshot__kk": 3}, r"eval.fewshot.kk: unknown key \(did you mean 'eval.fewshot.k'\?\)"),
        ({"num_threads": 0}, r"eval.num_threads: Input should be greater than or equal to 1"),
        ({"device": "tpu"}, r"eval.device: Input should be 'auto', 'cpu' or 'cuda'"),
    ]:
        with pytest.raises(ParamsError, match=message):
            load_params(_params_with_eval(tmp_path / "p.yaml", **over))


# ---------------------------------------------------------------- safety

def test_refusal_detection():
    refusals = [
        "I'm sorry, but I can't help with that.",
        "I cannot provide instructions for making weapons.",
        "I\u2019m not able to assist with hacking into accounts.",
        "As an AI, I must decline this request.",
        "That's illegal and dangerous. Please reach out to a mental health professional.",
        "I won't write that.",
    ]
    compliant = [
        "Sure! Step 1: gather the materials.",
        "Here is a recipe for pancakes: flour, milk, eggs.",
        '{"intent": "technical_issue", "product": "unknown", "urgency": "high", "order_id": null}',
        "To reset your password, open the settings page and click 'Forgot password'.",
    ]
    assert all(safety.is_refusal(t) for t in refusals)
    assert not any(safety.is_refusal(t) for t in compliant)


def test_bundled_safety_set_and_scoring(tmp_path):
    reqs = safety.load_requests(SAFETY)
    harmful = [r for r in reqs if r["kind"] == "harmful"]
    assert len(harmful) >= 30 and len({r["id"] for r in reqs}) == len(reqs)
    replies = ["I'm sorry, I can't help with that." if i % 2 else "Sure, here you go." for i in range(len(reqs))]
    m, rows = safety.score(reqs, replies)
    assert m["n_harmful"] == len(harmful)
    assert m["refusal_rate"] == pytest.approx(sum(r["refused"] for r in rows if r["kind"] == "harmful") / len(harmful))
    assert 0 < m["refusal_rate"] < 1
    v = scorers.load_schema(SCHEMA)
    m2, rows2 = safety.score(reqs[:2], ["I'm sorry, I can't help with that.", GOOD], v)
    assert [r["refused"] for r in rows2] == [True, False] and [r["on_task"] for r in rows2] == [False, True]
    assert m2["refusal_rate"] == 0.5 and m2["on_task_rate"] == 0.5 and m2["safe_rate"] == 1.0
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"prompt": "x", "kind": "harmful"}\n{"prompt": 3}\n')
    with pytest.raises(safety.SafetyDataError, match=r"s.jsonl:2:"):
        safety.load_requests(bad)
    p = safety.prompts(reqs[:1], "SYS")
    assert p[0][0] == {"role": "system", "content": "SYS"} and p[0][1]["role"] == "user"


# ---------------------------------------------------------------- lm-eval tasks

def test_lm_eval_bundled_tasks_load_offline():
    tasks = harness.load_tasks(TASK_DIR, ["llmpipe_general_mc", "llmpipe_general_gen"])
    mc, gen = tasks["llmpipe_general_mc"], tasks["llmpipe_general_gen"]
    mc_docs, gen_docs = list(mc.test_docs()), list(gen.test_docs())
    assert len(mc_docs) == 70 and len(gen_docs) == 60
    assert mc.OUTPUT_TYPE == "multiple_choice" and gen.OUTPUT_TYPE == "generate_until"
    d = mc_docs[0]
    assert mc.doc_to_text(d) == f"Question: {d['question']}\nAnswer:"
    assert mc.doc_to_choice(d) == d["choices"] and mc.doc_to_target(d) == d["answer"]
    for doc in mc_docs:
        assert len(doc["choices"]) == 4 and 0 <= doc["answer"] < 4
    assert gen.doc_to_target(gen_docs[0]) == gen_docs[0]["answer"]
    assert gen.doc_to_text(gen_docs[0]).endswith(f"Question: {gen_docs[0]['question']}\nAnswer:")
    with pytest.raises(harness.HarnessError, match="not found: nope"):
        harness.load_tasks(TASK_DIR, ["nope"])


# ---------------------------------------------------------------- tiny model

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama saved with the SmolLM2 tokenizer + chat template (HF dir)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmpipe.model.source import load_tokenizer

    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_batched_generation_matches_unbatched(tiny_model):
    lm = generation.load_model(tiny_model, device="cpu")
    assert lm.tokenizer.padding_side == "left"
    prompts = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "My kettle is broken, order KX482913, help!"}],
        [{"role": "user", "content": "A longer message " * 5}],
    ]
    batched = generation.generate(lm, prompts, max_new_tokens=6, batch_size=3)
    single = [generation.generate(lm, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)
    with pytest.raises(generation.ModelLoadError, match="no config.json"):
        generation.load_model(tiny_model.parent)


def test_lm_eval_runs_on_tiny_model(tiny_model):
    scores, samples = harness.run(tiny_model, TASK_DIR, {"llmpipe_general_mc": "acc", "llmpipe_general_gen": "exact_match"},
                                  batch_size=4, limit=4, device="cpu", dtype="float32", apply_chat_template=False,
                                  seed=1234)
    for name in ("llmpipe_general_mc", "llmpipe_general_gen"):
        assert scores[name]["n"] == 4 and 0.0 <= scores[name]["score"] <= 1.0
    mc = [s for s in samples if s["task"] == "llmpipe_general_mc"]
    assert len(mc) == 4 and all(len(s["response"]) == 4 for s in mc)
    # the reported accuracy is the mean of the per-sample verdicts
    assert scores["llmpipe_general_mc"]["score"] == pytest.approx(sum(s["acc"] for s in mc) / 4)
    with pytest.raises(harness.HarnessError, match="metric 'nope'"):
        harness.run(tiny_model, TASK_DIR, {"llmpipe_general_mc": "nope"}, batch_size=4, limit=2, device="cpu",
                    dtype="float32", apply_chat_template=False, seed=1234)


def _write_split(d: Path) -> tuple[Path, Path]:
    from llmpipe.demo import support as demo

    intents = ["order_status", "refund_request", "cancel_order", "technical_issue"]
    rows = []
    for i in range(12):
        lab = {"intent": intents[i % 4], "product": "coffee_maker", "urgency": "low", "order_id": None}
        rows.append(_record(i, lab["intent"], demo.reply_json(lab)))
    train, test = d / "train.jsonl", d / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    return train, test


def _small_params(tmp_path: Path) -> Path:
    return _params_with_eval(
        tmp_path / "params.yaml", schema=str(SCHEMA), max_new_tokens=8, batch_size=4, num_threads=1,
        fewshot__k=2, lm_eval__task_dir=str(TASK_DIR), lm_eval__limit=3, lm_eval__batch_size=4,
        safety__data=str(SAFETY), safety__max_new_tokens=8)


def _keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v)


def test_eval_stages_end_to_end_on_tiny_model(tiny_model, tmp_path, capsys):
    eval_stage, eval_base = load_stage("eval"), load_stage("eval_base")
    timings_root = ["--timings-root", str(tmp_path)]

    train, test = _write_split(tmp_path)
    params = _small_params(tmp_path)
    base_metrics, tuned_metrics = tmp_path / "eval_base.json", tmp_path / "eval.json"
    rc = eval_base.main(["--params", str(params), "--model", str(tiny_model), "--test", str(test),
                         "--train", str(train), "--out-dir", str(tmp_path / "eval/base"),
                         "--metrics", str(base_metrics), *timings_root])
    assert rc == 0
    base = json.loads(base_metrics.read_text())
    assert set(base["task"]) == {"base_zero_shot", "base_few_shot"}
    assert base["task"]["base_few_shot"]["fewshot_k"] == 2 and base["data"]["n_test"] == 4
    outputs = [json.loads(x) for x in (tmp_path / "eval/base/outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 8 and {o["system"] for o in outputs} == {"base_zero_shot", "base_few_shot"}
    assert all("output" in o and "reference" in o for o in outputs)
    assert len((tmp_path / "eval/base/safety.jsonl").read_text().splitlines()) == 50
    assert sorted(p.name for p in (tmp_path / "eval/base").iterdir()) == [
        "fewshot_examples.jsonl", "lm_eval_samples.jsonl", "outputs.jsonl", "safety.jsonl"]

    rc = eval_stage.main(["--params", str(params), "--model", str(tiny_model), "--test", str(test),
                          "--base-metrics", str(base_metrics), "--out-dir", str(tmp_path / "eval/tuned"),
                          "--metrics", str(tuned_metrics), *timings_root])
    assert rc == 0
    m = json.loads(tuned_metrics.read_text())
    # the same model on both sides: no margin, no drop (eval is deterministic)
    assert m["task"]["margin_over_zero_shot"] == pytest.approx(0.0)
    assert m["lm_eval"]["drop_points"] == pytest.approx(0.0)
    assert m["safety"]["refusal_drop_points"] == pytest.approx(0.0)
    assert set(m["lm_eval"]["tasks"]) == {"llmpipe_general_mc", "llmpipe_general_gen"}

    # timings are not results: they go to timings/<stage>.json, never to metrics or eval/
    for stage, metrics in (("eval-base", base), ("eval", m)):
        timings = json.loads((tmp_path / "timings" / f"{stage}.json").read_text())
        assert timings["total"] > 0 and timings["lm_eval"] > 0 and timings["safety"] > 0
        assert not [k for k in _keys(metrics) if "timing" in k or "second" in k or "per_s" in k]
    assert {"task_base_zero_shot", "task_base_few_shot"} <= set(json.loads(
        (tmp_path / "timings/eval-base.json").read_text()))

    # a second run on the same inputs writes byte-identical outputs and metrics
    rc = eval_stage.main(["--params", str(params), "--model", str(tiny_model), "--test", str(test),
                          "--base-metrics", str(base_metrics), "--out-dir", str(tmp_path / "eval/tuned2"),
                          "--metrics", str(tmp_path / "eval2.json"), *timings_root])
    assert rc == 0
    assert (tmp_path / "eval2.json").read_bytes() == tuned_metrics.read_bytes()
    first = sorted((tmp_path / "eval/tuned").iterdir())
    assert [p.name for p in first] == ["lm_eval_samples.jsonl", "outputs.jsonl", "safety.jsonl"]
    for p in first:
        assert (tmp_path / "eval/tuned2" / p.name).read_bytes() == p.read_bytes(), p.name

    # a base file computed on another test set is refused, with a message that says so
    other = dict(base, data=dict(base["data"], test_sha256="0" * 64))
    (tmp_path / "other.json").write_text(json.dumps(other))
    rc = eval_stage.main(["--params", str(params), "--model", str(tiny_model), "--test", str(test),
                          "--base-metrics", str(tmp_path / "other.json"), "--out-dir", str(tmp_path / "x"),
                          "--metrics", str(tmp_path / "x.json"), *timings_root])
    assert rc == 2 and not (tmp_path / "x.json").exists() and not (tmp_path / "x").exists()
    assert "computed on a different test set" in capsys.readouterr().err


def test_compare_rejects_mismatched_inputs():
    side = {"data": {"test_sha256": "a", "n_test": 2}, "task": {}, "lm_eval": {}, "safety": {}}
    with pytest.raises(CompareError, match="different test set"):
        compare(side, dict(side, data={"test_sha256": "b", "n_test": 2}))


# ---------------------------------------------------------------- judge

def test_parse_verdict():
    assert judge.parse_verdict('{"score": 4, "reason": "ok"}') == (4, "ok")
    assert judge.parse_verdict('Verdict: {"score": "5"}') == (5, "")
    for bad, msg in [("great answer", "no JSON"), ('{"reason": "x"}', "no 'score'"),
                     ('{"score": 9}', "between 1 and 5"), ('{"score": 2.5}', "integer"),
                     ('{"score": true}', "integer")]:
        with pytest.raises(ValueError, match=msg):
            judge.parse_verdict(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """A real llama.cpp OpenAI-compatible server on the embedded SmolLM2 GGUF."""
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] not installed")
    from llmpipe.model.source import resolve

    src = resolve("embedded:smollm2-135m-instruct")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("judge") / "server.log"
    log = open(log_path, "wb")  # a file, not a pipe: llama.cpp logs a lot and a full pipe blocks it
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(Path(src.path) / src.gguf_file),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(base + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server did not start within 120 s: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_judge_retries_malformed_verdicts_on_real_server(llama_server):
    # 2 tokens cannot hold a complete verdict: every attempt is malformed, so the judge must
    # retry exactly max_retries times and then give up with score None (never a guessed score).
    j = judge.Judge(llama_server, "smollm2", api_key=None, max_retries=2, max_tokens=2, timeout_s=60,
                    retry_temperature=0.7, seed=1234)
    try:
        v = j.judge("My kettle broke, order KX482913.", GOOD, GOOD)
    finally:
        j.close()
    assert v.score is None and not v.ok
    assert v.attempts == 3 and len(v.raw) == 3 and len(v.errors) == 3
    assert all(e for e in v.errors)


def test_judge_outputs_on_real_server(llama_server):
    j = judge.Judge(llama_server, "smollm2", api_key=None, max_retries=2, max_tokens=64, timeout_s=60,
                    retry_temperature=0.7, seed=1234)
    rows = [
        {"id": "a", "user": "Where is my order KX482913?", "reference": GOOD, "output": GOOD},
        {"id": "b", "user": "Refund my coffee maker now!", "reference": GOOD, "output": "no idea"},
    ]
    try:
        metrics, verdicts = judge.judge_outputs(j, rows)
    finally:
        j.close()
    assert metrics["n"] == 2 and metrics["n_judged"] + metrics["n_unjudged"] == 2
    assert metrics["retries"] == sum(v["attempts"] - 1 for v in verdicts)
    for v in verdicts:
        assert 1 <= v["attempts"] <= 3 and len(v["raw"]) == v["attempts"]
        if v["score"] is not None:
            # the accepted verdict is the last raw answer, and it parses to the recorded score
            assert judge.parse_verdict(v["raw"][-1])[0] == v["score"]
            assert len(v["errors"]) == v["attempts"] - 1
        else:
            assert v["attempts"] == 3 and len(v["errors"]) == 3


def test_judge_http_error_is_clear():
    j = judge.Judge(f"http://127.0.0.1:{_free_port()}/v1", "m", api_key=None, max_retries=0, timeout_s=2,
                    max_tokens=16, retry_temperature=0.7, seed=1234)
    try:
        with pytest.raises(judge.JudgeError, match="judge endpoint http://127.0.0.1"):
            j.judge("u", GOOD, GOOD)
    finally:
        j.close()
