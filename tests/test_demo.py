"""Tests for the bundled support-triage demo data (src/llmpipe/demo/, data/raw/)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from llmpipe.demo import support as demo

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw"
SCHEMA = ROOT / "data" / "task" / "support_triage.schema.json"
ORDER_ID_TOKEN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{6}(?![A-Za-z0-9])")
TOTAL = sum(demo.N_BASE.values()) + sum(demo.N_EXACT.values()) + sum(demo.N_NEAR.values()) \
    + len(demo.BAD_KINDS) * demo.N_BAD_PER_KIND


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def dataset() -> demo.DemoDataset:
    return demo.generate()


def _bad_kind(line: str) -> str | None:
    """Classify one messages-file line independently of the generator (None = good)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return "malformed_json"
    roles = [m["role"] for m in obj["messages"]]
    if any(r not in ("system", "user", "assistant") for r in roles):
        return "unknown_role"
    if roles[-1] != "assistant":
        return "ends_with_user"
    reply = obj["messages"][-1]["content"]
    if not reply.strip():
        return "empty_reply"
    if len(reply.split()) < 4:
        return "short_reply"
    return None


@pytest.fixture(scope="module")
def records() -> dict:
    """Everything in data/raw, parsed: good records as dicts and bad lines by kind."""
    good, bad = [], Counter()
    text = (RAW / demo.MESSAGES_FILE).read_text(encoding="utf-8")
    for line in text.splitlines():
        kind = _bad_kind(line)
        if kind:
            bad[kind] += 1
            continue
        obj = json.loads(line)
        roles = [m["role"] for m in obj["messages"]]
        assert roles == ["system", "user", "assistant"], roles
        good.append({"fmt": "messages", "system": obj["messages"][0]["content"],
                     "user": obj["messages"][1]["content"], "reply": obj["messages"][2]["content"],
                     "metadata": obj["metadata"]})
    for line in (RAW / demo.SHAREGPT_FILE).read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        assert [c["from"] for c in obj["conversations"]] == ["system", "human", "gpt"]
        good.append({"fmt": "sharegpt", "system": obj["conversations"][0]["value"],
                     "user": obj["conversations"][1]["value"], "reply": obj["conversations"][2]["value"],
                     "metadata": obj["metadata"]})
    alpaca = json.loads((RAW / demo.ALPACA_FILE).read_text(encoding="utf-8"))
    assert isinstance(alpaca, list)
    for obj in alpaca:
        assert set(obj) == {"instruction", "input", "output", "metadata"}
        good.append({"fmt": "alpaca", "system": None, "instruction": obj["instruction"],
                     "user": obj["input"], "reply": obj["output"], "metadata": obj["metadata"]})
    return {"good": good, "bad": bad, "n_alpaca": len(alpaca)}


# --------------------------------------------------------------------------- reproducibility

def test_generator_reproduces_committed_files_byte_for_byte(tmp_path, dataset):
    assert sorted(p.name for p in RAW.iterdir()) == sorted(demo.ALL_FILES)
    assert demo.main(["--out", str(tmp_path)]) == 0
    for name in demo.ALL_FILES:
        committed = (RAW / name).read_bytes()
        assert (tmp_path / name).read_bytes() == committed, f"{name} differs from the generator output"
        assert dataset.files[name].encode("utf-8") == committed


# --------------------------------------------------------------------------- counts and formats

def test_counts_and_format_proportions(records, dataset):
    n_msg = len((RAW / demo.MESSAGES_FILE).read_text(encoding="utf-8").splitlines())
    n_sg = len((RAW / demo.SHAREGPT_FILE).read_text(encoding="utf-8").splitlines())
    n_al = records["n_alpaca"]
    total = n_msg + n_sg + n_al
    assert total == TOTAL == len(dataset.examples)
    assert dataset.counts_per_file() == {demo.MESSAGES_FILE: n_msg, demo.ALPACA_FILE: n_al,
                                         demo.SHAREGPT_FILE: n_sg}
    assert len(records["good"]) >= 1500
    assert 0.72 <= n_msg / total <= 0.78
    assert 0.10 <= n_al / total <= 0.14
    assert 0.11 <= n_sg / total <= 0.15
    assert sum(p.stat().st_size for p in RAW.iterdir()) < 2_000_000


def test_bad_records_only_in_messages_file_at_one_percent(records):
    assert records["bad"] == {k: demo.N_BAD_PER_KIND for k in demo.BAD_KINDS}
    n_bad = sum(records["bad"].values())
    assert 0.007 <= n_bad / TOTAL <= 0.013


# --------------------------------------------------------------------------- replies and labels

def test_system_prompt_matches_params():
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert demo.SYSTEM_PROMPT == params["validate"]["default_system_prompt"]


def test_label_space_matches_task_schema():
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    props = schema["properties"]
    assert list(demo.INTENTS) == props["intent"]["enum"]
    assert list(demo.PRODUCTS) == props["product"]["enum"]
    assert list(demo.URGENCIES) == props["urgency"]["enum"]
    assert demo.ORDER_ID_RE.pattern == props["order_id"]["pattern"]
    assert list(demo.REPLY_KEYS) == schema["required"]


def test_every_good_reply_is_compact_json_with_fixed_keys(records):
    for r in records["good"]:
        obj = json.loads(r["reply"])
        assert list(obj) == ["intent", "product", "urgency", "order_id"], r["reply"]
        assert obj["intent"] in demo.INTENTS
        assert obj["product"] in demo.PRODUCTS
        assert obj["urgency"] in demo.URGENCIES
        assert obj["order_id"] is None or re.fullmatch(r"[A-Z]{2}[0-9]{6}", obj["order_id"])
        assert r["reply"] == json.dumps(obj, separators=(", ", ": "))
        assert r["metadata"] == {"intent": obj["intent"]}
        if r["fmt"] == "alpaca":
            assert r["instruction"] in demo.ALPACA_INSTRUCTIONS
        else:
            assert r["system"] == demo.SYSTEM_PROMPT


def test_label_balance(records):
    labels = [json.loads(r["reply"]) for r in records["good"]]
    intents = Counter(l["intent"] for l in labels)
    assert set(intents) == set(demo.INTENTS)
    assert min(intents.values()) >= 100
    products = Counter(l["product"] for l in labels)
    assert set(products) == set(demo.PRODUCTS) and min(products.values()) >= 60
    urg = Counter(l["urgency"] for l in labels)
    assert all(urg[u] >= 0.2 * len(labels) for u in demo.URGENCIES), urg
    with_id = sum(l["order_id"] is not None for l in labels)
    assert 0.3 * len(labels) <= with_id <= 0.7 * len(labels)
    for intent in demo.INTENTS:   # products and order ids vary within each intent
        sub = [l for l in labels if l["intent"] == intent]
        assert len({l["product"] for l in sub}) >= 5
        assert len({l["order_id"] is None for l in sub}) == 2


def _has(phrases, text: str) -> bool:
    low = text.lower()
    return any(re.search(rf"(?<![a-z0-9]){re.escape(p)}(?![a-z0-9])", low) for p in phrases)


def test_labels_are_determined_by_the_text(records):
    for r in records["good"]:
        lab, text = json.loads(r["reply"]), r["user"]
        assert 150 <= len(text) <= 600, len(text)
        # order id: verbatim in the text, and the only order-id-like token
        tokens = set(ORDER_ID_TOKEN.findall(text))
        assert tokens == ({lab["order_id"]} if lab["order_id"] else set()), (tokens, text)
        # product: named by one of its synonyms, and no other product is named
        named = [p for p, syn in demo.PRODUCT_SYNONYMS.items() if _has(syn, text)]
        assert named == ([] if lab["product"] == "unknown" else [lab["product"]]), (named, text)
        # urgency: low cue -> low; else high cue -> high; else medium
        want = "low" if _has(demo.LOW_CUES, text) else "high" if _has(demo.HIGH_CUES, text) else "medium"
        assert lab["urgency"] == want, text


def test_intent_templates_are_disjoint():
    seen: dict[str, str] = {}
    for intent, bodies in demo.BODIES.items():
        assert len(bodies) >= 12, intent
        for b in bodies:
            assert seen.setdefault(b, intent) == intent, f"template shared by {intent} and {seen[b]}"


def test_variety_typos_and_casual(records):
    users = [r["user"] for r in records["good"]]
    lengths = sorted(len(u) for u in users)
    assert lengths[len(lengths) // 10] < 220 and lengths[-(len(lengths) // 10)] > 330
    assert sum(u[0].islower() for u in users) >= 100             # casual lower-case starts
    assert sum(" pls " in u or " u " in u for u in users) >= 50     # chat-speak
    typos = {"wroong", "recieved", "pormo"}                          # a few typos we know are in
    assert sum(any(t in u for t in typos) for u in users) >= 1
    brands = ("ThermaSense", "AuraBuds", "VacuBot", "FitPulse", "BrewMaster", "PageLight",
              "SentryCam", "QuickBoil", "Roomba-style", "Nest-style")
    assert all(any(b in u for u in users) for b in brands)


# --------------------------------------------------------------------------- PII

def test_pii_is_planted_and_valid(dataset):
    good = [e for e in dataset.examples if not e.kind.startswith("bad:")]
    by_type = Counter(t for e in good for t, _ in e.pii)
    for etype in demo.PII_TYPES:
        assert by_type[etype] >= 20, (etype, by_type)
    assert sum(bool(e.pii) for e in good) >= 0.8 * len(good)
    for e in good:
        for etype, value in e.pii:
            assert value in e.user
            assert value not in e.reply
            if etype == "CREDIT_CARD":
                assert demo.luhn_valid(value), value
                assert len(re.sub(r"\D", "", value)) in (15, 16)
            elif etype == "IBAN_CODE":
                assert demo.iban_valid(value), value
            elif etype == "US_SSN":
                assert re.fullmatch(r"\d{3}([- ])\d{2}\1\d{4}", value), value
                assert not value.startswith(("000", "666", "9"))
            elif etype == "EMAIL_ADDRESS":
                assert re.fullmatch(r"[a-z0-9._]+@[a-z]+\.[a-z]+", value), value
            elif etype == "IP_ADDRESS":
                assert all(0 <= int(x) <= 255 for x in value.split(".")), value


def test_luhn_and_iban_helpers_reject_corrupted_numbers():
    assert demo.luhn_valid("4111 1111 1111 1111") and not demo.luhn_valid("4111 1111 1111 1112")
    assert demo.iban_valid("DE89 3704 0044 0532 0130 00") and not demo.iban_valid("DE88370400440532013000")
    assert demo.iban_valid("GB29NWBK60161331926819")


# --------------------------------------------------------------------------- duplicates

def _norm_key(r: dict) -> tuple[str, str]:
    user = r["user"] if r["fmt"] != "alpaca" else f"{r['instruction']}\n\n{r['user']}"
    return demo.normalize(user), demo.normalize(r["reply"])


def test_exact_duplicates_planted_at_three_percent(records):
    keys = Counter(_norm_key(r) for r in records["good"])
    extra_copies = sum(c - 1 for c in keys.values())
    assert extra_copies == sum(demo.N_EXACT.values())
    assert 0.025 <= extra_copies / TOTAL <= 0.035
    assert max(keys.values()) == 2
    # spread across the files: duplicated pairs occur inside each file and across two files
    fmts_by_key: dict = {}
    for r in records["good"]:
        fmts_by_key.setdefault(_norm_key(r), []).append(r["fmt"])
    pair_kinds = Counter(tuple(sorted(v)) for v in fmts_by_key.values() if len(v) == 2)
    assert set(pair_kinds) == {("messages", "messages"), ("messages", "sharegpt"),
                               ("sharegpt", "sharegpt"), ("alpaca", "alpaca")}


def test_near_duplicates_planted_at_four_percent(dataset, records):
    near = [e for e in dataset.examples if e.kind == "near_dup"]
    assert len(near) == sum(demo.N_NEAR.values())
    assert 0.035 <= len(near) / TOTAL <= 0.045
    users = Counter(r["user"] for r in records["good"])
    for e in near:
        src = dataset.examples[e.dup_of]
        assert src.kind == "base" and e.labels == src.labels
        assert users[e.user] == 1 and users[src.user] >= 1      # both are in the files
        assert demo.normalize(e.user) != demo.normalize(src.user)  # not an exact duplicate
        assert demo.jaccard(demo.masked_text(e), demo.masked_text(src)) >= demo.NEAR_MIN_JACCARD
    assert len({e.dup_of for e in near}) == len(near)


def test_distinct_examples_are_not_near_duplicates_of_each_other(dataset):
    """No unplanted pair of distinct examples reaches the dedup threshold (after PII masking)."""
    from datasketch import MinHash, MinHashLSH

    base = [demo.masked_text(e) for e in dataset.examples if e.kind == "base"]
    assert len(base) == sum(demo.N_BASE.values()) == len(set(base))
    lsh = MinHashLSH(threshold=0.6, num_perm=64)
    sigs = []
    for i, text in enumerate(base):
        m = MinHash(num_perm=64)
        m.update_batch([s.encode("utf-8") for s in demo._shingles(text)])
        lsh.insert(i, m)
        sigs.append(m)
    worst = 0.0
    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            if j > i:
                worst = max(worst, demo.jaccard(base[i], base[j]))
    assert worst < 0.78, worst


# --------------------------------------------------------------------------- generator guards

def test_check_example_rejects_inconsistent_labels():
    ok = demo.Example(
        user="Hi, where is order KX482913? I ordered the robot vacuum two weeks ago and nothing "
             "has arrived yet. This is urgent! You can reach me at jane.doe@gmail.com. Thanks, Jane",
        labels={"intent": "order_status", "product": "robot_vacuum", "urgency": "high", "order_id": "KX482913"},
        pii=[("EMAIL_ADDRESS", "jane.doe@gmail.com")])
    demo.check_example(ok)
    for key, wrong in (("product", "coffee_maker"), ("urgency", "medium"), ("order_id", None),
                       ("order_id", "KX482914")):
        bad = demo.Example(user=ok.user, labels={**ok.labels, key: wrong}, pii=ok.pii)
        with pytest.raises(demo.DemoGenerationError):
            demo.check_example(bad)
    short = demo.Example(user="where is KX482913?", labels=ok.labels | {"product": "unknown", "urgency": "medium"})
    with pytest.raises(demo.DemoGenerationError, match="length"):
        demo.check_example(short)


# --------------------------------------------------------------------------- safety mix

def _shingles(text: str, k: int = 5) -> set[str]:
    t = " ".join(text.lower().split())
    return {t[i:i + k] for i in range(max(1, len(t) - k + 1))}


def test_safety_records_refuse_harm_help_otherwise_and_are_pinned_to_train():
    from llmpipe.demo import safety as safety_demo
    from llmpipe.evaluate.safety import is_refusal

    lines = (RAW / safety_demo.FILE).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows == safety_demo.generate()
    kinds = Counter(r["metadata"]["kind"] for r in rows)
    assert kinds == {"refusal": sum(map(len, safety_demo.HARMFUL_ACTS.values())) * 2,
                     "helpful": len(safety_demo.HELPFUL) + len(safety_demo.HELPFUL_ACTS)}
    assert kinds["helpful"] == kinds["refusal"]      # balanced: phrasing alone never predicts a refusal
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert r["metadata"]["split"] == "train" and "intent" not in r["metadata"]
        assert r["messages"][0]["content"] != demo.SYSTEM_PROMPT      # never the triage prompt
        # the eval's refusal detector agrees with the label of every reply
        assert is_refusal(r["messages"][2]["content"]) == (r["metadata"]["kind"] == "refusal"), r
    systems = Counter(r["messages"][0]["content"] for r in rows)
    assert systems.most_common(1)[0][0] == safety_demo.SMOLLM_DEFAULT_SYSTEM


def test_safety_eval_prompts_are_not_copies_of_training_prompts():
    """The eval's harmful requests test generalisation: none is a near copy of a train prompt."""
    from llmpipe.demo import safety as safety_demo

    train = [_shingles(r["messages"][1]["content"]) for r in safety_demo.generate()]
    eval_rows = [json.loads(line) for line in
                 (ROOT / "data" / "eval" / "safety" / "harmful_requests.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in eval_rows} == {"harmful", "benign"}
    for row in eval_rows:      # harmful requests and benign controls alike
        sh = _shingles(row["prompt"])
        best = max(len(sh & t) / len(sh | t) for t in train)
        assert best < 0.5, (row["prompt"], best)
