"""split: determinism, ratios, stratification, hashes, dataset version, contamination, stage."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from llmpipe.config import ParamsError, parse_params, read_yaml
from llmpipe.config.data import SplitSection
from llmpipe.data import split as split_module
from llmpipe.data.split import (
    MISSING_STRATUM,
    SPLITS,
    allocate,
    dataset_version,
    order_key,
    split_file,
    split_records,
)

REPO = Path(__file__).resolve().parents[1]
INTENTS = ["order_status", "refund_request", "cancel_order", "technical_issue", "billing_question"]
# stratum sizes: large, medium, small, tiny (3 and 2), plus records without the key
SIZES = {"order_status": 120, "refund_request": 57, "cancel_order": 33, "technical_issue": 3,
         "billing_question": 2, None: 11}


def _record(user: str, intent: str | None, line: int) -> dict:
    messages = [
        {"role": "system", "content": "You are a support triage assistant."},
        {"role": "user", "content": user},
        {"role": "assistant", "content": json.dumps({"intent": intent})},
    ]
    blob = json.dumps(messages, sort_keys=True, separators=(",", ":"))
    return {
        "id": hashlib.sha256(blob.encode()).hexdigest()[:16],
        "messages": messages,
        "metadata": {} if intent is None else {"intent": intent},
        "source": {"file": "data/raw/synthetic.jsonl", "line": line, "format": "messages"},
    }


def _text(rng: random.Random, vocab: list[str], n_words: int = 40) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n_words))


def _corpus(seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(3000)]
    recs = []
    for intent, n in SIZES.items():
        for _ in range(n):
            recs.append(_record(_text(rng, vocab), intent, len(recs) + 1))
    return recs


SPLIT = dict(ratios={"train": 0.8, "val": 0.1, "test": 0.1}, seed=1234, stratify_key="intent", pin_key="split",
             contamination_threshold=0.8, contamination_num_perm=128, contamination_shingle_size=5,
             contamination_roles=["user"])


def split_cfg(**overrides) -> SplitSection:
    return SplitSection.model_validate({**SPLIT, **overrides})


CFG = split_cfg()


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module")
def result(corpus):
    return split_records(corpus, CFG)


def test_same_input_twice_and_shuffled_input_give_identical_bytes(corpus, result):
    again = split_records([dict(r) for r in corpus], CFG)
    shuffled = list(corpus)
    random.Random(5).shuffle(shuffled)
    shuf = split_records(shuffled, CFG)
    for s in SPLITS:
        assert again.files[s] == result.files[s]
        assert shuf.files[s] == result.files[s]
    assert shuf.metrics == result.metrics
    other_seed = split_records(corpus, split_cfg(seed=99))
    assert other_seed.metrics["dataset_version"] != result.metrics["dataset_version"]


def test_every_record_in_exactly_one_split(corpus, result):
    ids = [r["id"] for s in SPLITS for r in result.splits[s]]
    assert sorted(ids) == sorted(r["id"] for r in corpus)
    assert sum(result.metrics["counts"].values()) == result.metrics["records"] == len(corpus)


def test_ratios_within_one_record_per_stratum(result):
    strata = result.metrics["strata"]
    assert set(strata) == {*(k for k in SIZES if k), MISSING_STRATUM}
    for name, counts in strata.items():
        n = sum(counts.values())
        assert n == SIZES[None if name == MISSING_STRATUM else name]
        if all(n * CFG.ratios[s] >= 1 for s in SPLITS):  # the at-least-one rule does not kick in
            for s in SPLITS:
                assert abs(counts[s] - n * CFG.ratios[s]) < 1, (name, s, counts)


def test_stratification_and_small_strata(result):
    for s in SPLITS:
        for rec in result.splits[s]:
            name = rec["metadata"].get("intent", MISSING_STRATUM)
            assert result.metrics["strata"][name][s] >= 1
    for name, counts in result.metrics["strata"].items():
        if sum(counts.values()) >= 3:
            assert all(counts[s] >= 1 for s in SPLITS), (name, counts)
    assert result.metrics["strata"]["technical_issue"] == {"train": 1, "val": 1, "test": 1}
    assert result.metrics["strata"]["billing_question"] == {"train": 2, "val": 0, "test": 0}


def test_allocate():
    r = {"train": 0.8, "val": 0.1, "test": 0.1}
    assert allocate(0, r) == {"train": 0, "val": 0, "test": 0}
    assert allocate(1, r) == {"train": 1, "val": 0, "test": 0}
    assert allocate(3, r) == {"train": 1, "val": 1, "test": 1}
    assert allocate(10, r) == {"train": 8, "val": 1, "test": 1}
    assert allocate(15, r) == {"train": 12, "val": 2, "test": 1}  # remainder: largest fraction, then order
    assert allocate(5, {"train": 0.5, "val": 0.5, "test": 0.0}) == {"train": 3, "val": 2, "test": 0}
    for n in range(0, 200):
        c = allocate(n, {"train": 0.7, "val": 0.2, "test": 0.1})
        assert sum(c.values()) == n


def test_hashes_and_dataset_version(result):
    for s in SPLITS:
        assert result.metrics["sha256"][s] == hashlib.sha256(result.files[s]).hexdigest()
    joined = "".join(result.metrics["sha256"][s] for s in SPLITS)
    assert result.metrics["dataset_version"] == hashlib.sha256(joined.encode()).hexdigest()
    assert dataset_version(result.metrics["sha256"]) == result.metrics["dataset_version"]


def test_dataset_version_changes_when_one_record_changes(corpus, result):
    changed = [dict(r) for r in corpus]
    changed[17] = dict(changed[17], metadata=dict(changed[17]["metadata"], note="edited"))
    other = split_records(changed, CFG)
    assert other.metrics["dataset_version"] != result.metrics["dataset_version"]
    assert sum(other.metrics["sha256"][s] != result.metrics["sha256"][s] for s in SPLITS) == 1


def test_pinned_records_go_to_their_split_and_move_nothing_else(corpus, result):
    rng = random.Random(5)
    vocab = ["".join(rng.choice("xyzw") for _ in range(6)) for _ in range(500)]
    pinned = []
    for i, target in enumerate(["train"] * 7 + ["val"] * 2 + ["test"]):
        rec = _record(_text(rng, vocab), None, 10_000 + i)
        rec["metadata"] = {"split": target, "purpose": "safety"}
        pinned.append(rec)
    both = split_records(pinned + corpus, CFG)
    for s in SPLITS:
        ids = [r["id"] for r in both.splits[s]]
        want = {r["id"] for r in pinned if r["metadata"]["split"] == s}
        assert want <= set(ids)
        # every unpinned record stays exactly where it was without the pinned ones
        assert [i for i in ids if i not in want] == [r["id"] for r in result.splits[s]]
    assert both.metrics["pinned"] == {"train": 7, "val": 2, "test": 1}
    assert both.metrics["strata"]["<pinned>"] == {"train": 7, "val": 2, "test": 1}
    assert result.metrics["pinned"] == {"train": 0, "val": 0, "test": 0}
    # pinning off: the same records are stratified like any other (stratum <missing>)
    unpinned = split_records(pinned + corpus, split_cfg(pin_key=None))
    assert unpinned.metrics["pinned"] == {"train": 0, "val": 0, "test": 0}
    bad = _record("bad pin", None, 20_000)
    bad["metadata"] = {"split": "holdout"}
    with pytest.raises(ValueError, match="metadata.split pins it"):
        split_records([bad] + corpus, CFG)


def test_contamination_detects_planted_cross_split_near_duplicates():
    rng = random.Random(21)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(3000)]
    recs = [_record(_text(rng, vocab, 60), rng.choice(INTENTS), i + 1) for i in range(150)]
    planted = {}
    for k in range(12):  # near copies (1 word changed) of the first 12 records, same intent
        src = recs[k]
        words = src["messages"][1]["content"].split(" ")
        words[rng.randrange(len(words))] = rng.choice(vocab)
        copy = _record(" ".join(words), src["metadata"]["intent"], 1000 + k)
        planted[copy["id"]] = src["id"]
        recs.append(copy)
    res = split_records(recs, CFG)
    split_of = {r["id"]: s for s in SPLITS for r in res.splits[s]}
    expected = set()
    for a, b in planted.items():
        sa, sb = split_of[a], split_of[b]
        if sa != sb and "train" in (sa, sb):
            expected.add((b, a) if sa == "train" else (a, b))  # (val/test id, train id)
    assert expected, "the fixed corpus must put at least one planted pair across splits"
    found = {(p["id"], p["train_id"]) for p in res.contamination}
    assert found == expected
    for p in res.contamination:
        assert p["split"] in ("val", "test") and split_of[p["id"]] == p["split"]
        assert split_of[p["train_id"]] == "train"
        assert p["jaccard"] >= CFG.contamination_threshold and p["source"] and p["train_source"]
    assert res.metrics["contamination_pairs"] == len(expected)
    # reported, not dropped
    assert sum(res.metrics["counts"].values()) == len(recs)


@pytest.mark.parametrize("change, message", [
    ({"ratios": {"train": 0.8, "val": 0.1, "test": 0.2}}, "split.ratios: Value error, ratios must sum to 1"),
    ({"ratios": {"train": 0.9, "val": 0.1}}, "split.ratios: Value error, needs exactly the keys"),
    ({"ratios": {"train": 0.9, "dev": 0.1}}, "split.ratios.dev.[key]: Input should be 'train', 'val' or 'test'"),
    ({"contamination_threshold": 0}, "split.contamination_threshold: Input should be greater than 0"),
    ({"stratify_key": ""}, "split.stratify_key: String should have at least 1 character"),
    ({"seed": None}, "split.seed: Input should be a valid integer"),
    ({"pin_keys": "split"}, "split.pin_keys: unknown key (did you mean 'split.pin_key'?)"),
])
def test_config_errors_name_the_param(change, message):
    raw = read_yaml(REPO / "params.yaml")
    raw["split"] = {**raw["split"], **change}
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert message in str(err.value)


def test_missing_key_is_an_error():
    raw = read_yaml(REPO / "params.yaml")
    del raw["split"]["pin_key"]
    with pytest.raises(ParamsError, match=r"split.pin_key: required key is missing"):
        parse_params(raw)


# --------------------------------------------------------------------------- stage


def _run_stage(tmp_path: Path, inp: Path, out_dir: Path, metrics: Path) -> subprocess.CompletedProcess:
    params = tmp_path / "params.yaml"
    raw = read_yaml(REPO / "params.yaml")
    raw["split"] = SPLIT
    params.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / "split.py"), "--params", str(params), "--input", str(inp),
         "--out-dir", str(out_dir), "--metrics", str(metrics)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


def test_stage_end_to_end(tmp_path, corpus, result):
    inp = tmp_path / "records.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in corpus), encoding="utf-8")
    out_dir, metrics_path = tmp_path / "split", tmp_path / "metrics" / "data.json"
    proc = _run_stage(tmp_path, inp, out_dir, metrics_path)
    assert proc.returncode == 0, proc.stderr
    assert "[split]" in proc.stderr
    metrics = json.loads(metrics_path.read_text())
    for s in SPLITS:
        data = (out_dir / f"{s}.jsonl").read_bytes()
        assert data == result.files[s]
        assert hashlib.sha256(data).hexdigest() == metrics["sha256"][s]
        assert len(data.splitlines()) == metrics["counts"][s]
    assert metrics["dataset_version"] == result.metrics["dataset_version"]
    assert (out_dir / "contamination.jsonl").read_text() == ""
    assert metrics["contamination_pairs"] == 0
    # running twice gives the same bytes
    proc = _run_stage(tmp_path, inp, out_dir, metrics_path)
    assert proc.returncode == 0
    assert json.loads(metrics_path.read_text()) == metrics


def test_stage_reports_missing_input(tmp_path):
    proc = _run_stage(tmp_path, tmp_path / "nope.jsonl", tmp_path / "split", tmp_path / "m.json")
    assert proc.returncode == 2
    assert "nope.jsonl: input file not found" in proc.stderr
    assert not (tmp_path / "split").exists()


# --------------------------------------------------------------------------- streaming engine


def _families(seed: int = 21, base: int = 160, copies: int = 4) -> list[dict]:
    """Records with families of near copies (1-4 words changed) and exact copies under the same id
    (another source line): many contamination pairs, Jaccard ties and repeated ids."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(800)]
    recs = [_record(_text(rng, vocab, 50), rng.choice(INTENTS), i + 1) for i in range(base)]
    for k in range(base // 2):
        src = recs[k]
        for c in range(copies):
            words = src["messages"][1]["content"].split(" ")
            for _ in range(rng.randint(0, 4)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            recs.append(_record(" ".join(words), src["metadata"]["intent"], 1000 + k * copies + c))
    recs.append(dict(recs[3], source={"file": "other.jsonl", "line": 1, "format": "messages"}))  # same id
    recs.append(dict(recs[3], source={"file": "other.jsonl", "line": 2, "format": "messages"}))
    recs.append(dict(_record("", "order_status", 5000)))  # no text: never a contamination pair
    return recs


def _datasketch_contamination(res, cfg: SplitSection) -> list[tuple]:
    """The contamination check as it was built on datasketch's MinHashLSH (the reference)."""
    from datasketch import LeanMinHash, MinHashLSH

    from llmpipe.data.dedup import (
        estimated_jaccard,
        lsh_params,
        minhash_signatures,
        near_text,
        selected_contents,
    )

    def lean(sig):
        return LeanMinHash(seed=1, hashvalues=sig, scheme="affine32")

    num_perm, k, thr = cfg.contamination_num_perm, cfg.contamination_shingle_size, cfg.contamination_threshold
    texts = {s: [near_text(selected_contents(r, cfg.contamination_roles)) for r in res.splits[s]] for s in SPLITS}
    sigs = {s: minhash_signatures(texts[s], num_perm, k) for s in SPLITS}
    lsh = MinHashLSH(threshold=thr, num_perm=num_perm, params=lsh_params(thr, num_perm))
    for i, text in enumerate(texts["train"]):
        if text:
            lsh.insert(i, lean(sigs["train"][i]))
    out = []
    for name in ("val", "test"):
        for i, text in enumerate(texts[name]):
            if not text:
                continue
            cands = sorted(lsh.query(lean(sigs[name][i])))
            sims = estimated_jaccard(sigs[name][i], sigs["train"][cands]) if cands else []
            hits = sorted(((float(s), c) for s, c in zip(sims, cands) if s >= thr), key=lambda t: (-t[0], t[1]))
            for jac, c in hits:
                out.append((name, res.splits[name][i]["id"], res.splits[name][i]["source"],
                            res.splits["train"][c]["id"], res.splits["train"][c]["source"], jac))
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.8])
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_contamination_equals_datasketch_lsh(threshold, blocks, monkeypatch):
    if blocks == "small":  # query blocks of 5 records, pair blocks of 7 (one query's partners span several)
        monkeypatch.setattr(split_module, "_QUERY_BLOCK", 5)
        monkeypatch.setattr(split_module, "_PAIR_BLOCK", 7)
    cfg = split_cfg(contamination_threshold=threshold)
    res = split_records(_families(), cfg)
    got = [(p["split"], p["id"], p["source"], p["train_id"], p["train_source"], p["jaccard"]) for p in res.contamination]
    want = _datasketch_contamination(res, cfg)
    assert len(want) > 40 and len({p[1] for p in want}) > 10  # many pairs, several per query
    assert got == want  # same pairs, same order, same Jaccard floats


def test_split_files_are_in_seeded_order_and_strata_cut_in_it(corpus, result):
    for s in SPLITS:
        keys = [order_key(r, CFG.seed) for r in result.splits[s]]
        assert keys == sorted(keys)
    for name in result.metrics["strata"]:
        keys = {s: [order_key(r, CFG.seed) for r in result.splits[s]
                    if r["metadata"].get("intent", MISSING_STRATUM) == name] for s in SPLITS}
        ordered = [k for s in SPLITS for k in keys[s]]
        assert ordered == sorted(ordered), name  # train, then val, then test in the seeded order


def _write_messy(path: Path, recs: list[dict], shards: int = 1) -> None:
    """Records as lines a pipeline might get: some not canonical (key order, ASCII escapes),
    blank lines, no final newline; ``shards`` > 1: a directory of part files."""
    rng = random.Random(8)
    lines = []
    for r in recs:
        if rng.random() < 0.3:
            lines.append(json.dumps(r, ensure_ascii=True) + "\n\n")
        else:
            lines.append(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    lines[-1] = lines[-1].rstrip("\n")
    if shards == 1:
        path.write_text("".join(lines), encoding="utf-8")
        return
    path.mkdir()
    cut = [len(lines) * k // shards for k in range(shards + 1)]
    for k in range(shards):
        (path / f"part-{k:05d}.jsonl").write_text("".join(lines[cut[k]:cut[k + 1]]), encoding="utf-8")


@pytest.mark.parametrize("shards", [1, 3])
def test_split_file_writes_split_records_bytes(tmp_path, shards):
    recs = _families()
    rng = random.Random(4)
    for r in rng.sample(recs, 12):  # pinned records, and a value of every JSON kind in metadata
        r["metadata"] = {**r["metadata"], "split": rng.choice(SPLITS), "score": 0.1, "tags": ["é", None]}
    cfg = split_cfg(contamination_threshold=0.5)
    want = split_records(recs, cfg)
    assert want.metrics["pinned"] != {"train": 0, "val": 0, "test": 0} and want.contamination
    inp = tmp_path / "records.jsonl"
    _write_messy(inp, recs, shards)
    metrics = split_file(inp, tmp_path / "out", cfg, batch_size=100)  # several batches
    for s in SPLITS:
        assert (tmp_path / "out" / f"{s}.jsonl").read_bytes() == want.files[s], s
    assert (tmp_path / "out" / "contamination.jsonl").read_text(encoding="utf-8") == "".join(
        json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in want.contamination)
    assert metrics == want.metrics
    assert sorted(os.listdir(tmp_path / "out")) == [  # no temp files left
        "contamination.jsonl", "test.jsonl", "train.jsonl", "val.jsonl"]


def test_split_file_memory_does_not_grow_with_records(tmp_path):
    """Python-heap peak (numpy included) of split_file at 1,000 and 4,000 records: the growth is
    the per-record assignment arrays (measured 71 bytes per record), not the records (~1.5 KB of
    JSON each here; split_records, which holds them, grows by ~40 KB per record)."""
    import tracemalloc

    rng = random.Random(2)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(2000)]
    peaks = {}
    for n in (1000, 4000):
        inp = tmp_path / f"r{n}.jsonl"
        inp.write_text("".join(json.dumps(_record(_text(rng, vocab, 200), rng.choice(INTENTS), i)) + "\n"
                               for i in range(n)), encoding="utf-8")
        tracemalloc.start()
        split_file(inp, tmp_path / f"out{n}", CFG, batch_size=500)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    per_record = (peaks[4000] - peaks[1000]) / 3000
    assert per_record < 300, peaks  # holding the records would be > 1,500 bytes per record


def test_stage_reports_a_bad_record_and_writes_nothing(tmp_path, corpus):
    bad = _record("bad pin", None, 20_000)
    bad["metadata"] = {"split": "holdout"}
    inp = tmp_path / "records.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in corpus[:50] + [bad] + corpus[50:]), encoding="utf-8")
    out_dir = tmp_path / "split"
    proc = _run_stage(tmp_path, inp, out_dir, tmp_path / "m.json")
    assert proc.returncode == 2
    assert "metadata.split pins it to a split" in proc.stderr and "'holdout'" in proc.stderr
    assert not out_dir.exists() or not list(out_dir.iterdir())  # no split file, no temp files
    assert not (tmp_path / "m.json").exists()
    inp.write_text(inp.read_text(encoding="utf-8") + '{"id": "x", "messages": "not a list"}\n', encoding="utf-8")
    proc = _run_stage(tmp_path, inp, out_dir, tmp_path / "m.json")
    assert proc.returncode == 2 and f"{inp}:{len(corpus) + 2}: record needs" in proc.stderr
