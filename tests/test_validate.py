"""validate: every input format, every reject reason, strict mode, and the stage end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmpipe.data import formats
from llmpipe.data.validate import (
    StrictValidationError,
    TokenCounter,
    ValidateConfig,
    iter_inputs,
    validate_items,
)
from llmpipe.model.source import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You triage support messages."
REPLY = '{"intent": "order_status", "product": "e_reader", "urgency": "low", "order_id": null}'


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter(load_tokenizer("embedded:smollm2-135m-instruct"))


def cfg(tmp_path: Path, **kw) -> ValidateConfig:
    base = dict(inputs=(str(tmp_path),), strict=False, require_system_prompt=True,
                default_system_prompt=SYSTEM, min_response_tokens=8, max_line_bytes=1_000_000,
                max_seq_len=512)
    base.update(kw)
    return ValidateConfig(**base)


def write_lines(path: Path, objs: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs), encoding="utf-8")
    return path


def run(tmp_path: Path, counter: TokenCounter, **kw):
    c = cfg(tmp_path, **kw)
    return validate_items(iter_inputs(c), c, counter)


def chat(user="Where is my order?", reply=REPLY, system=True, **extra):
    msgs = ([{"role": "system", "content": SYSTEM}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": msgs, **extra}


# --- formats -------------------------------------------------------------------------------

def test_messages_format_with_metadata_and_content_parts(tmp_path, counter):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Where "},
                                                      {"type": "text", "text": "is it?"}]},
                          {"role": "assistant", "content": REPLY}]}
    write_lines(tmp_path / "a.jsonl", [chat(metadata={"intent": "order_status"}), parts])
    res = run(tmp_path, counter)
    assert res.metrics["records_valid"] == 2 and not res.rejects
    first, second = res.records
    assert first["metadata"] == {"intent": "order_status"}
    assert first["source"] == {"file": str(tmp_path / "a.jsonl"), "line": 1, "format": "messages"}
    assert second["messages"][1]["content"] == "Where is it?"
    # default system prompt is inserted where missing
    assert second["messages"][0] == {"role": "system", "content": SYSTEM}
    assert len(first["id"]) == 16 and first["id"] != second["id"]


def test_alpaca_json_array(tmp_path, counter):
    rows = [{"instruction": "Triage this support message.", "input": "My kettle broke, order KX482913.",
             "output": REPLY},
            {"instruction": "Say hi to the customer in a friendly way please", "input": "",
             "output": "Hello there, thank you for reaching out to us today!"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    res = run(tmp_path, counter)
    assert res.metrics["valid_by_format"] == {"alpaca": 2}
    msgs = res.records[0]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"] == "Triage this support message.\n\nMy kettle broke, order KX482913."
    assert res.records[1]["messages"][1]["content"] == rows[1]["instruction"]
    assert res.records[0]["source"]["line"] == 2  # line where the array element starts


def test_sharegpt_role_variants(tmp_path, counter):
    row = {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "hi, order?"},
                             {"from": "gpt", "value": REPLY}, {"from": "USER", "value": "thanks, and?"},
                             {"from": "chatgpt", "value": REPLY}]}
    no_sys = {"conversations": [{"from": "human", "value": "hello"}, {"from": "model", "value": REPLY}],
              "system": "Custom system."}
    write_lines(tmp_path / "sg.jsonl", [row, no_sys])
    res = run(tmp_path, counter)
    assert not res.rejects
    assert [m["role"] for m in res.records[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert res.records[1]["messages"][0]["content"] == "Custom system."


# --- each rejection reason -----------------------------------------------------------------

REASON_CASES = {
    "malformed_json": '{"messages": [',
    "not_an_object": "[1, 2]",
    "unknown_format": {"prompt": "x", "completion": "y"},
    "wrong_type": {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": REPLY}]},
    "unknown_role": {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": REPLY}]},
    "non_text_content": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                                      {"role": "assistant", "content": REPLY}]},
    "empty_content": chat(reply="   "),
    "system_not_first": {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                      {"role": "assistant", "content": REPLY}]},
    "no_user_turn": {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": REPLY}]},
    "bad_alternation": {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                     {"role": "assistant", "content": REPLY}]},
    "last_not_assistant": {"messages": [{"role": "user", "content": "a"}]},
    "response_too_short": chat(reply="ok"),
    "too_many_tokens": chat(user="word " * 800),
}


@pytest.mark.parametrize("reason", sorted(REASON_CASES))
def test_each_reject_reason(tmp_path, counter, reason):
    write_lines(tmp_path / "in.jsonl", [chat(), REASON_CASES[reason], chat(user="another one")])
    res = run(tmp_path, counter)
    assert [r.reason for r in res.rejects] == [reason]
    rej = res.rejects[0]
    assert rej.source["file"] == str(tmp_path / "in.jsonl") and rej.source["line"] == 2
    assert rej.detail
    assert res.metrics["records_valid"] == 2
    assert res.metrics["rejected_by_reason"] == {reason: 1}
    assert res.metrics["items_read"] == 3


def test_missing_system_prompt_when_required(tmp_path, counter):
    write_lines(tmp_path / "in.jsonl", [chat(system=False)])
    res = run(tmp_path, counter, default_system_prompt=None)
    assert [r.reason for r in res.rejects] == ["missing_system_prompt"]
    res = run(tmp_path, counter, default_system_prompt=None, require_system_prompt=False)
    assert not res.rejects


def test_invalid_utf8_names_line_and_byte(tmp_path, counter):
    good = json.dumps(chat()).encode()
    (tmp_path / "bin.jsonl").write_bytes(good + b"\n" + b'{"messages": "caf\xe9"}\n' + good + b"\n")
    res = run(tmp_path, counter)
    (rej,) = res.rejects
    assert rej.reason == "invalid_utf8" and rej.source["line"] == 2 and "byte 17" in rej.detail
    assert res.metrics["records_valid"] == 2


def test_empty_file_and_whitespace_file(tmp_path, counter):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    write_lines(tmp_path / "ok.jsonl", [chat()])
    res = run(tmp_path, counter)
    assert sorted((Path(r.source["file"]).name, r.reason) for r in res.rejects) == [
        ("blank.jsonl", "empty_file"), ("empty.jsonl", "empty_file")]
    assert res.metrics["records_valid"] == 1


def test_truncated_json_array_keeps_complete_records(tmp_path, counter):
    rows = [{"instruction": "Triage this support message.", "input": f"message {i}", "output": REPLY}
            for i in range(3)]
    text = json.dumps(rows, indent=2)
    (tmp_path / "cut.json").write_text(text[: text.rfind("}") - 5], encoding="utf-8")
    res = run(tmp_path, counter)
    assert res.metrics["records_valid"] == 2
    (rej,) = res.rejects
    assert rej.reason == "truncated_json_array" and "truncated" in rej.detail
    assert rej.source["line"] > 1


def test_fifty_megabyte_line_is_rejected_without_reading_it_whole(tmp_path, counter):
    big = '{"messages": [{"role": "user", "content": "' + "x" * (50 * 1024 * 1024) + '"}]}'
    with open(tmp_path / "big.jsonl", "w") as fh:
        fh.write(json.dumps(chat()) + "\n" + big + "\n" + json.dumps(chat(user="after")) + "\n")
    res = run(tmp_path, counter, max_line_bytes=10_000_000)
    (rej,) = res.rejects
    assert rej.reason == "line_too_long" and rej.source["line"] == 2
    assert "52428" in rej.detail  # the measured length is reported
    assert res.metrics["records_valid"] == 2


def test_strict_mode_fails_fast_with_file_and_line(tmp_path, counter):
    write_lines(tmp_path / "in.jsonl", [chat(), '{"messages": [', chat()])
    with pytest.raises(StrictValidationError, match=r"in\.jsonl:2: malformed_json"):
        run(tmp_path, counter, strict=True)


def test_nothing_is_dropped_silently(tmp_path, counter):
    objs = [chat(), *REASON_CASES.values(), chat(user="last")]
    write_lines(tmp_path / "mix.jsonl", objs)
    res = run(tmp_path, counter)
    assert res.metrics["items_read"] == len(objs) == len(res.records) + len(res.rejects)


def test_discover_errors_on_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        formats.discover([str(tmp_path / "nope")])


# --- the stage script ----------------------------------------------------------------------

def test_stage_writes_outputs_and_metrics(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_lines(raw / "a.jsonl", [chat(), '{"bad json', chat(user="second")])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["validate"]["inputs"] = [str(raw)]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "stages" / "validate.py"), "--params", str(tmp_path / "params.yaml"),
           "--out-records", str(out / "r.jsonl"), "--out-rejects", str(out / "x.jsonl"),
           "--metrics", str(out / "m.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len((out / "r.jsonl").read_text().splitlines()) == 2
    rejects = [json.loads(line) for line in (out / "x.jsonl").read_text().splitlines()]
    assert rejects[0]["reason"] == "malformed_json" and rejects[0]["source"]["line"] == 2
    metrics = json.loads((out / "m.json").read_text())
    assert metrics["records_valid"] == 2 and metrics["rejected_by_reason"] == {"malformed_json": 1}
    assert "a.jsonl:2: malformed_json" in proc.stderr
    # strict: non-zero exit, clear message, no outputs written
    params["validate"]["strict"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out2 = tmp_path / "out2"
    cmd = [c.replace(str(out), str(out2)) for c in cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "a.jsonl:2: malformed_json" in proc.stderr
    assert not out2.exists()
