"""minhash-dedup: signatures, exact + near duplicate detection, report, stage end to end."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash

from llmpipe.config import ParamsError, parse_params, read_yaml
from llmpipe.config.data import DedupSection
from llmpipe.data.dedup import (
    DedupError,
    dedup_file,
    dedup_records,
    estimated_jaccard,
    exact_key,
    lean_minhash,
    lsh_params,
    make_lsh,
    minhash_signatures,
    near_text,
    normalize_text,
    read_records,
    selected_contents,
    shingle_hash,
    shingles,
)
from llmpipe.data import dedup as dedup_module
from llmpipe.data import lsh_index
from llmpipe.io import write_jsonl

REPO = Path(__file__).resolve().parents[1]
DEDUP = dict(num_perm=128, threshold=0.8, shingle_size=5, roles=["user", "assistant"])


def dedup_cfg(**overrides) -> DedupSection:
    return DedupSection.model_validate({**DEDUP, **overrides})
SYSTEM = "You are a support triage assistant."


# --------------------------------------------------------------------------- corpus helpers


def _record(user: str, assistant: str, line: int, system: str = SYSTEM, meta: dict | None = None) -> dict:
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]
    blob = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {
        "id": hashlib.sha256(blob.encode()).hexdigest()[:16],
        "messages": messages,
        "metadata": dict(meta or {}),
        "source": {"file": "data/raw/synthetic.jsonl", "line": line, "format": "messages"},
    }


def _vocab(rng: random.Random, n: int = 4000) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(n)]


def _words(rng: random.Random, vocab: list[str], chars: int) -> list[str]:
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(vocab))
    return out


def _planted_corpus(seed: int = 7, n_orig: int = 400, n_exact: int = 60, n_case: int = 60, n_near: int = 120):
    """Distinct ~400-char records plus planted copies placed after their original.

    Returns (records, truth) with truth[copy_id] = (original_id, "exact"|"near").
    Near copies change 2 or 3 of ~55 user words (true Jaccard of the 5-shingle sets 0.84-0.93).
    """
    rng = random.Random(seed)
    vocab = _vocab(rng)
    origs = []
    for i in range(n_orig):
        user = " ".join(_words(rng, vocab, 320))
        assistant = json.dumps({"intent": rng.choice(vocab), "note": " ".join(_words(rng, vocab, 50))})
        origs.append((user, assistant))
    order: list[tuple[int, str, str, str]] = [(i, u, a, "orig") for i, (u, a) in enumerate(origs)]
    plans = ["exact"] * n_exact + ["case"] * n_case + ["near"] * n_near
    for kind in plans:
        src = rng.randrange(n_orig)
        u, a = origs[src]
        if kind == "case":
            ws = [rng.choice((w.upper(), w.title(), w)) for w in u.split(" ")]
            u = " " + "".join(w + rng.choice((" ", "  ", "\n", "\t ")) for w in ws)
        elif kind == "near":
            ws = u.split(" ")
            for pos in rng.sample(range(len(ws)), rng.choice((2, 3))):
                ws[pos] = rng.choice(vocab)
            u = " ".join(ws)
        # insert after the original: find the original's position, pick a later slot
        src_pos = next(k for k, t in enumerate(order) if t[0] == src and t[3] == "orig")
        order.insert(rng.randint(src_pos + 1, len(order)), (src, u, a, kind))
    records, truth = [], {}
    orig_ids = {}
    for line, (src, u, a, kind) in enumerate(order, start=1):
        rec = _record(u, a, line)
        if kind == "orig":
            orig_ids[src] = rec["id"]
        records.append((rec, src, kind))
    out = []
    seen = set()
    for rec, src, kind in records:
        if kind == "exact":  # give exact copies a distinct id and system prompt so they are separate rows
            rec = _record(rec["messages"][1]["content"], rec["messages"][2]["content"], rec["source"]["line"],
                          system=SYSTEM + f" (copy {rec['source']['line']})")
        assert rec["id"] not in seen
        seen.add(rec["id"])
        if kind != "orig":
            truth[rec["id"]] = (orig_ids[src], "exact" if kind in ("exact", "case") else "near")
        out.append(rec)
    return out, truth


def _removed(clusters: list[dict]) -> dict[str, tuple[str, dict]]:
    return {m["id"]: (c["kept"]["id"], m) for c in clusters for m in c["removed"]}


# --------------------------------------------------------------------------- signatures


def test_signatures_equal_datasketch_minhash():
    rng = random.Random(3)
    texts = ["", "a", "abcd", "abcde", "héllo wörld ✓ 𝔘nicode", "x" * 7]
    texts += ["".join(rng.choice("ab cdé\n") for _ in range(rng.randint(0, 60))) for _ in range(80)]
    texts += ["".join(rng.choice("abcdefgh ") for _ in range(n)) for n in (9000, 20000)]  # > one work block
    for k, num_perm in ((1, 16), (3, 64), (5, 128)):
        sig = minhash_signatures(texts, num_perm, k)
        for i, text in enumerate(texts):
            ref = MinHash(num_perm=num_perm, seed=1, hashfunc=shingle_hash)
            ref.update_batch(shingles(text, k))
            assert np.array_equal(ref.hashvalues, sig[i]), (k, num_perm, i)


def test_shingle_hash_is_fnv1a_and_shingles_edge_cases():
    assert shingle_hash("") == 2166136261
    assert shingle_hash("a") == ((2166136261 ^ 97) * 16777619) & 0xFFFFFFFF
    assert shingles("", 5) == set()
    assert shingles("abc", 5) == {"abc"}
    assert shingles("abcdef", 5) == {"abcde", "bcdef"}


def test_normalize_text():
    assert normalize_text("  Hello\t\nWORLD  ") == "hello world"
    assert normalize_text("Straße") == "strasse"
    assert normalize_text("ｆｕｌｌｗｉｄｔｈ") == "fullwidth"  # NFKC
    assert normalize_text("Hi, there!") == "hi, there!"  # punctuation kept


def test_lsh_params_reach_target_recall_at_threshold():
    for t in (0.5, 0.7, 0.8, 0.9, 0.95):
        b, r = lsh_params(t, 128)
        assert b * r <= 128
        assert 1 - (1 - t**r) ** b >= 0.99
        # one more row per band would fall below the target (r is the largest that reaches it)
        b2 = 128 // (r + 1)
        assert b2 < 2 or 1 - (1 - t ** (r + 1)) ** b2 < 0.99


# --------------------------------------------------------------------------- dedup quality


@pytest.fixture(scope="module")
def planted():
    return _planted_corpus()


@pytest.fixture(scope="module")
def planted_result(planted):
    records, _ = planted
    return dedup_records(records, dedup_cfg())


def test_precision_recall_on_planted_duplicates(planted, planted_result):
    records, truth = planted
    kept, clusters, metrics = planted_result
    removed = _removed(clusters)
    true_pos = [rid for rid in removed if rid in truth and removed[rid][0] == truth[rid][0]]
    precision = len(true_pos) / len(removed)
    recall = len(true_pos) / len(truth)
    exact_truth = [rid for rid, (_, kind) in truth.items() if kind == "exact"]
    near_truth = [rid for rid, (_, kind) in truth.items() if kind == "near"]
    exact_recall = sum(1 for rid in exact_truth if rid in removed and removed[rid][1]["kind"] == "exact")
    near_recall = sum(1 for rid in near_truth if rid in removed and removed[rid][1]["kind"] == "near")
    # Measured on this corpus (near copies: true Jaccard 0.84-0.93, median 0.89): precision 1.0,
    # recall 0.9875 (exact 120/120, near 117/120; datasketch's default 9x13 banding: near 101/120).
    assert precision >= 0.99, precision
    assert recall >= 0.97, recall
    assert exact_recall == len(exact_truth)  # case/whitespace copies are exact duplicates
    assert near_recall / len(near_truth) >= 0.95
    assert metrics["exact_duplicates_removed"] == len(exact_truth)


def test_first_of_cluster_is_kept_and_report_is_complete(planted, planted_result):
    records, _ = planted
    kept, clusters, metrics = planted_result
    position = {r["id"]: i for i, r in enumerate(records)}
    removed = _removed(clusters)
    kept_ids = [r["id"] for r in kept]
    # in = out + removed, every input id exactly once in kept or removed
    assert metrics["records_in"] == len(records)
    assert metrics["records_out"] == len(kept)
    assert len(kept) + len(removed) == len(records)
    assert sorted(kept_ids + list(removed)) == sorted(position)
    assert metrics["exact_duplicates_removed"] + metrics["near_duplicates_removed"] == len(removed)
    assert metrics["clusters"] == len(clusters)
    # kept records keep input order; each cluster's kept record precedes all its removed members
    assert [position[i] for i in kept_ids] == sorted(position[i] for i in kept_ids)
    threshold = DEDUP["threshold"]
    for c in clusters:
        assert c["kept"]["id"] in kept_ids
        assert c["kept"]["source"] == records[position[c["kept"]["id"]]]["source"]
        assert c["size"] == 1 + len(c["removed"])
        for m in c["removed"]:
            assert position[m["id"]] > position[c["kept"]["id"]]
            assert m["source"] == records[position[m["id"]]]["source"]
            assert m["kind"] in ("exact", "near") and m["reason"]
            assert m["jaccard"] == 1.0 if m["kind"] == "exact" else threshold <= m["jaccard"] <= 1.0


def test_explicit_cluster_small_example():
    base = "my robot vacuum stopped charging after the last update and now blinks red, order KX482913"
    recs = [
        _record("completely different question about my e-reader battery life", "{}", 1),
        _record(base, '{"a": 1}', 2),
        _record(base.upper().replace(" ", "  "), '{"a": 1}', 3),           # exact after normalisation
        _record(base.replace("blinks red", "blinks redd"), '{"a": 1}', 4),  # near
        _record(base.replace("blinks red", "blinks redd"), '{"a": 1}', 5, system="other system"),  # exact of #4
    ]
    kept, clusters, metrics = dedup_records(recs, dedup_cfg())
    assert [r["source"]["line"] for r in kept] == [1, 2]
    assert len(clusters) == 1
    c = clusters[0]
    assert c["kept"]["id"] == recs[1]["id"]
    assert [(m["source"]["line"], m["kind"]) for m in c["removed"]] == [(3, "exact"), (4, "near"), (5, "near")]
    assert c["removed"][1]["jaccard"] == c["removed"][2]["jaccard"] < 1.0
    assert metrics["exact_duplicates_removed"] == 1 and metrics["near_duplicates_removed"] == 2


def test_roles_select_the_dedup_key():
    a = _record("where is my order KX482913 please help", '{"intent": "order_status"}', 1)
    b = _record("where is my order KX482913 please help", '{"intent": "refund_request"}', 2)
    kept, _, m = dedup_records([a, b], dedup_cfg(num_perm=64, roles=["user"]))
    assert len(kept) == 1 and m["exact_duplicates_removed"] == 1
    kept, _, m = dedup_records([a, b], dedup_cfg(num_perm=64, roles=["user", "assistant"]))
    assert len(kept) == 2 or m["near_duplicates_removed"] == 1  # never an exact duplicate
    assert m["exact_duplicates_removed"] == 0


def test_threshold_effect(planted):
    records, _ = planted
    _, _, low = dedup_records(records, dedup_cfg(threshold=0.7))
    _, _, mid = dedup_records(records, dedup_cfg(threshold=0.8))
    _, _, high = dedup_records(records, dedup_cfg(threshold=0.97))
    # exact duplicates do not depend on the threshold
    assert low["exact_duplicates_removed"] == mid["exact_duplicates_removed"] == high["exact_duplicates_removed"]
    # a 2-word change (Jaccard ~0.85-0.9) is a near duplicate at 0.8, not at 0.97
    assert low["near_duplicates_removed"] >= mid["near_duplicates_removed"] > high["near_duplicates_removed"]
    assert high["near_duplicates_removed"] <= 0.1 * mid["near_duplicates_removed"]
    assert mid["params"]["threshold"] == 0.8 and high["params"]["threshold"] == 0.97


def test_empty_text_records_are_only_exact_deduped():
    a = _record("", "", 1)
    b = _record(" ", "\n", 2, system="x")
    kept, clusters, m = dedup_records([a, b], dedup_cfg())
    assert len(kept) == 1 and m["exact_duplicates_removed"] == 1 and m["records_without_text"] == 1


@pytest.mark.parametrize("change, message", [
    ({"threshold": 1.5}, "dedup.threshold: Input should be less than or equal to 1"),
    ({"roles": ["bot"]}, "dedup.roles.0: Input should be 'system', 'user' or 'assistant'"),
    ({"roles": ["user", "user"]}, "dedup.roles: Value error, roles must be distinct"),
    ({"num_perm": 8}, "dedup.num_perm: Input should be greater than or equal to 16"),
    ({"shingle_sise": 5}, "dedup.shingle_sise: unknown key (did you mean 'dedup.shingle_size'?)"),
])
def test_config_errors_name_the_param(change, message):
    raw = read_yaml(REPO / "params.yaml")
    raw["dedup"] = {**raw["dedup"], **change}
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert message in str(err.value)


def test_malformed_record_names_its_source():
    with pytest.raises(DedupError, match=r"record #0 .*synthetic.jsonl:1.*messages"):
        dedup_records([{"id": "x", "messages": "nope", "source": {"file": "synthetic.jsonl", "line": 1}}],
                      dedup_cfg())


# --------------------------------------------------------------------------- reference: datasketch LSH


def _datasketch_dedup(records, cfg):
    """The former local engine, kept as the reference: exact keys in a dict, then datasketch's
    MinHashLSH queried record by record in input order (only kept records are indexed); a record
    joins its most similar kept candidate (first maximum) when that reaches the threshold."""
    rep_index, exact_copies, first_by_key, texts = [], {}, {}, []
    for i, rec in enumerate(records):
        contents = selected_contents(rec, cfg.roles, i)
        rep = first_by_key.setdefault(exact_key(contents), i)
        if rep == i:
            rep_index.append(i)
            texts.append(near_text(contents))
        else:
            exact_copies.setdefault(rep, []).append(i)
    sig = minhash_signatures(texts, cfg.num_perm, cfg.shingle_size)
    lsh = make_lsh(cfg.threshold, cfg.num_perm)
    near_of, kept_rep_pos, empty = {}, [], 0
    for pos, i in enumerate(rep_index):
        if not texts[pos]:
            empty += 1
            kept_rep_pos.append(pos)
            continue
        mh = lean_minhash(sig[pos])
        cands = sorted(lsh.query(mh))
        if cands:
            sims = estimated_jaccard(sig[pos], sig[cands])
            best = int(np.argmax(sims))
            if sims[best] >= cfg.threshold:
                near_of[i] = (rep_index[cands[best]], float(sims[best]))
                continue
        lsh.insert(pos, mh, check_duplication=False)
        kept_rep_pos.append(pos)
    return _reference_assemble(records, cfg, rep_index, exact_copies, near_of, kept_rep_pos, empty)


def _reference_assemble(records, cfg, rep_index, exact_copies, near_of, kept_rep_pos, empty):
    """The cluster report as it was built before ``dedup_report`` (dicts per removed record,
    grouped, sorted), kept as the reference for :class:`ClusterReport`."""
    removed_by_kept = {}

    def remove(index, kept, kind, jaccard, reason):
        member = {"id": records[index].get("id"), "source": records[index].get("source"), "kind": kind,
                  "jaccard": jaccard, "reason": reason}
        removed_by_kept.setdefault(kept, []).append((index, member))

    def rid(index):
        return records[index].get("id")

    for rep, (kept, jac) in near_of.items():
        why = f"near duplicate (Jaccard {jac:.3f} >= {cfg.threshold}) of kept record {rid(kept)}"
        remove(rep, kept, "near", jac, why)
        for c in exact_copies.get(rep, []):
            remove(c, kept, "near", jac, f"{why}; exact copy of removed record {rid(rep)}")
    for rep, copies in exact_copies.items():
        if rep not in near_of:
            for c in copies:
                remove(c, rep, "exact", 1.0, f"exact duplicate (after normalisation) of kept record {rid(rep)}")
    clusters = []
    for kept in sorted(removed_by_kept):
        members = [m for _, m in sorted(removed_by_kept[kept], key=lambda t: t[0])]
        clusters.append({"kept": {"id": rid(kept), "source": records[kept].get("source")},
                         "removed": members, "size": 1 + len(members)})
    kept_records = [records[i] for i in sorted(rep_index[p] for p in kept_rep_pos)]
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    metrics = {
        "records_in": len(records),
        "records_out": len(kept_records),
        "exact_duplicates_removed": sum(1 for c in clusters for m in c["removed"] if m["kind"] == "exact"),
        "near_duplicates_removed": sum(1 for c in clusters for m in c["removed"] if m["kind"] == "near"),
        "clusters": len(clusters),
        "records_without_text": empty,
        "params": {**cfg.model_dump(mode="json"),
                   "normalization": "nfkc+casefold+collapse_whitespace (punctuation kept)",
                   "minhash_seed": dedup_module.MINHASH_SEED, "minhash_scheme": dedup_module.MINHASH_SCHEME,
                   "shingle_hash": "fnv1a32-codepoints", "lsh_bands": bands, "lsh_rows": rows},
    }
    return kept_records, clusters, metrics


def _chain_corpus(seed: int = 5, n_base: int = 60, n_variants: int = 700) -> list[dict]:
    """Dense near-duplicate families: every variant mutates a random earlier member of its
    family by a few words, so families hold chains (A~B, B~C, A!~C), ties and records that
    are near several kept records; plus exact copies, case copies and empty texts."""
    rng = random.Random(seed)
    vocab = _vocab(rng, 600)
    families = [[" ".join(_words(rng, vocab, 200))] for _ in range(n_base)]
    texts = [f[0] for f in families]
    for _ in range(n_variants):
        fam = rng.choice(families)
        ws = rng.choice(fam).split(" ")
        for pos in rng.sample(range(len(ws)), rng.choice((1, 2, 3, 4))):
            ws[pos] = rng.choice(vocab)
        text = " ".join(ws)
        fam.append(text)
        texts.append(text)
        if rng.random() < 0.05:
            texts.append(rng.choice(texts).upper())
        if rng.random() < 0.02:
            texts.append("")
    rng.shuffle(texts)
    return [_record(t, "{}" if k % 3 else "", k + 1, system=f"s{k}") for k, t in enumerate(texts)]


@pytest.mark.parametrize("threshold, num_perm", [(0.8, 128), (0.7, 64), (0.9, 128), (0.5, 32), (0.75, 100)])
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_same_decisions_as_datasketch_lsh(threshold, num_perm, blocks, monkeypatch):
    if blocks == "small":  # many record blocks (index lookups across blocks) and pair blocks
        monkeypatch.setattr(lsh_index, "BLOCK_RECORDS", 37)
        monkeypatch.setattr(lsh_index, "PAIR_BLOCK", 101)
    records = _chain_corpus()
    cfg = dedup_cfg(threshold=threshold, num_perm=num_perm)
    kept, clusters, metrics = dedup_records(records, cfg)
    ref_kept, ref_clusters, ref_metrics = _datasketch_dedup(records, cfg)
    assert metrics["near_duplicates_removed"] > 50 and metrics["exact_duplicates_removed"] > 10
    assert [r["id"] for r in kept] == [r["id"] for r in ref_kept]
    assert clusters == ref_clusters
    assert metrics == ref_metrics


def test_same_decisions_as_datasketch_on_planted(planted, planted_result):
    records, _ = planted
    assert planted_result == _datasketch_dedup(records, dedup_cfg())


@pytest.mark.parametrize("shards", [1, 3])
def test_dedup_file_writes_the_same_bytes(tmp_path, shards, monkeypatch):
    monkeypatch.setattr(dedup_module, "_CHUNK_RECORDS", 64)  # several signature batches per pass
    records = _chain_corpus(n_base=20, n_variants=200)
    inp = tmp_path / "in.jsonl"
    # half the lines not in the pipeline's own spelling (key order, ASCII escapes): re-serialised
    inp.write_text("".join(json.dumps(r, ensure_ascii=bool(k % 2)) + "\n" for k, r in enumerate(records)),
                   encoding="utf-8")
    cfg = dedup_cfg()
    kept, clusters, metrics = dedup_records(read_records(str(inp)), cfg)
    write_jsonl(tmp_path / "ref.jsonl", kept)
    write_jsonl(tmp_path / "ref_clusters.jsonl", clusters)
    out = tmp_path / "out" / "records.jsonl"
    got_clusters, got_metrics = dedup_file(inp, out, cfg, shards=shards)
    assert got_clusters == clusters and got_metrics == metrics
    ref = (tmp_path / "ref.jsonl").read_bytes()
    if shards == 1:
        assert out.read_bytes() == ref
    else:
        parts = sorted(out.iterdir())
        assert [q.name for q in parts] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
        assert b"".join(q.read_bytes() for q in parts) == ref
        assert [r["id"] for r in read_records(str(out))] == [r["id"] for r in kept]  # a reader takes the dir
    assert not [q for q in (tmp_path / "out").iterdir() if q.name.startswith(".")]  # temp files gone
    # the sharded output deduplicates again to the same result (input given as a directory)
    again, again_metrics = dedup_file(out, tmp_path / "again.jsonl", cfg)
    assert again == [] and again_metrics["records_in"] == again_metrics["records_out"] == len(kept)


# --------------------------------------------------------------------------- stage


def _run_stage(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, str(REPO / "stages" / "dedup.py"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _write_params(tmp_path: Path, threshold: float = 0.8) -> Path:
    """The repository's params.yaml with the dedup section of these tests."""
    raw = read_yaml(REPO / "params.yaml")
    raw["dedup"] = {**DEDUP, "threshold": threshold}
    p = tmp_path / "params.yaml"
    p.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    return p


def test_stage_end_to_end(tmp_path, planted, planted_result):
    records, _ = planted
    inp = tmp_path / "scrubbed.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out, clu, met = tmp_path / "out" / "records.jsonl", tmp_path / "out" / "clusters.jsonl", tmp_path / "m.json"
    proc = _run_stage(["--params", str(_write_params(tmp_path)), "--input", str(inp), "--out-records", str(out),
                       "--out-clusters", str(clu), "--metrics", str(met)])
    assert proc.returncode == 0, proc.stderr
    assert "[dedup]" in proc.stderr
    kept, clusters, metrics = planted_result
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [r["id"] for r in kept]
    assert [json.loads(line) for line in clu.read_text().splitlines()] == json.loads(json.dumps(clusters))
    assert json.loads(met.read_text()) == json.loads(json.dumps(metrics))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_stage_reports_bad_input_line(tmp_path):
    inp = tmp_path / "bad.jsonl"
    inp.write_text(json.dumps(_record("hello there", "{}", 1)) + "\n{not json\n", encoding="utf-8")
    out = tmp_path / "records.jsonl"
    proc = _run_stage(["--params", str(_write_params(tmp_path)), "--input", str(inp), "--out-records", str(out),
                       "--out-clusters", str(tmp_path / "c.jsonl"), "--metrics", str(tmp_path / "m.json")])
    assert proc.returncode == 2
    assert f"{inp}:2: invalid JSON" in proc.stderr
    assert not out.exists()


def test_read_records_errors(tmp_path):
    with pytest.raises(DedupError, match="input file not found"):
        read_records(str(tmp_path / "missing.jsonl"))
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a", "messages": []}\n\n[1]\n', encoding="utf-8")
    with pytest.raises(DedupError, match=r"x.jsonl:3: expected a JSON object"):
        read_records(str(p))


# --------------------------------------------------------------------------- Ray engine


@pytest.fixture(scope="module")
def embedded_ray():
    pytest.importorskip("ray")
    from llmpipe.config.data import CurationSection
    from llmpipe.curation.ray_runtime import ray_session

    # 3 partitions, 2 CPUs: partitions outnumber the CPUs; small batches: many per pass
    curation = CurationSection.model_validate(
        dict(engine="ray", ray_address=None, num_cpus=2, batch_size=53, workers=3, shards=1))
    with ray_session(curation):
        yield curation


@pytest.mark.slow
@pytest.mark.parametrize("threshold, num_perm, shards", [(0.8, 128, 1), (0.5, 32, 3)])
def test_ray_engine_writes_the_local_bytes(embedded_ray, tmp_path, threshold, num_perm, shards, monkeypatch):
    from llmpipe.curation.ray_dedup import dedup_file_ray

    monkeypatch.setattr(lsh_index, "BLOCK_RECORDS", 41)  # many near-pass blocks: removed records leave the index

    records = _chain_corpus(n_base=30, n_variants=300)
    inp = tmp_path / "in.jsonl"
    # half the lines not in the pipeline's own spelling: re-serialised by both engines
    inp.write_text("".join(json.dumps(r, ensure_ascii=bool(k % 2)) + "\n" for k, r in enumerate(records)),
                   encoding="utf-8")
    cfg = dedup_cfg(threshold=threshold, num_perm=num_perm)
    clusters, metrics = dedup_file(inp, tmp_path / "local" / "records.jsonl", cfg, shards=shards)
    got_clusters, got_metrics = dedup_file_ray(inp, tmp_path / "ray" / "records.jsonl", cfg, embedded_ray,
                                               shards=shards)
    assert metrics["near_duplicates_removed"] > 20 and metrics["exact_duplicates_removed"] > 2
    assert got_clusters == clusters and got_metrics == metrics
    local, ray_out = tmp_path / "local" / "records.jsonl", tmp_path / "ray" / "records.jsonl"
    if shards == 1:
        assert ray_out.read_bytes() == local.read_bytes()
    else:
        assert [p.name for p in sorted(ray_out.iterdir())] == [p.name for p in sorted(local.iterdir())]
        assert all(p.read_bytes() == (local / p.name).read_bytes() for p in ray_out.iterdir())
    assert not [p for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")]  # temp files gone


@pytest.mark.slow
def test_ray_engine_reports_bad_lines_and_empty_input(embedded_ray, tmp_path):
    from llmpipe.curation.ray_dedup import dedup_file_ray

    good = [json.dumps(_record(f"hello there number {k}", "{}", k + 1)) for k in range(120)]
    inp = tmp_path / "bad.jsonl"
    inp.write_text("\n".join(good[:100] + ["{not json"] + good[100:] + ['{"id": "x", "messages": "nope"}']) + "\n",
                   encoding="utf-8")
    out = tmp_path / "out" / "records.jsonl"
    with pytest.raises(DedupError, match=rf"{inp}:101: invalid JSON"):  # the first bad line, as locally
        dedup_file_ray(inp, out, dedup_cfg(), embedded_ray)
    assert not out.exists()
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    clusters, metrics = dedup_file_ray(tmp_path / "empty.jsonl", out, dedup_cfg(), embedded_ray)
    assert clusters == [] and metrics["records_in"] == metrics["records_out"] == 0 and out.read_bytes() == b""


def _near_inputs(records, cfg):
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    texts = [near_text(selected_contents(r, cfg.roles)) for r in records]
    sig = minhash_signatures(texts, cfg.num_perm, cfg.shingle_size)
    keys = dedup_module.band_keys(sig, bands, rows)
    rep = dedup_module.exact_groups(np.array([list(bytes.fromhex(exact_key(selected_contents(r, cfg.roles))))
                                              for r in records], dtype=np.uint8))
    skip = (rep != np.arange(len(records))) | np.array([not t for t in texts])
    return sig, keys, skip, bands, rows


@pytest.mark.parametrize("parts, block", [(1, 1000), (3, 29)])
def test_partitioned_bucket_indexes_give_the_local_decisions(monkeypatch, parts, block):
    # the Ray engine's near pass without Ray: P bucket indexes (hash partitions of the band
    # keys, signing batches of 16), blocks of records in input order, 7-candidate pair
    # blocks (some with no pair), against the local engine's one index over whole arrays
    records = _chain_corpus(n_base=10, n_variants=150)
    cfg = dedup_cfg()
    sig, keys, skip, bands, rows = _near_inputs(records, cfg)
    n = len(records)
    every = np.arange(n, dtype=np.int32)
    one = lsh_index.BucketIndex(skip, sig.astype(np.uint8), sig, bands, rows, cfg.threshold,
                                [(keys[:, k], every) for k in range(bands)])
    expected, _ = lsh_index.near_pass(lambda lo, hi, removed: [one.pairs(lo, hi, removed)], n, cfg.num_perm)

    monkeypatch.setattr(lsh_index, "PAIR_BLOCK", 7)
    batch = 16
    starts = range(0, n, batch)
    partitioned = [lsh_index.bucket_partitions(s, keys[s:s + batch], parts) for s in starts]
    sig2 = lsh_index.low_bit_codes(sig.astype(np.uint8))  # packed once for all indexes, as on Ray
    index = [lsh_index.BucketIndex(skip, sig.astype(np.uint8), sig, bands, rows, cfg.threshold,
                                   [pp[p] for pp in partitioned], sig2) for p in range(parts)]
    near_of, confirmed = lsh_index.near_pass(lambda lo, hi, removed: [ix.pairs(lo, hi, removed) for ix in index],
                                             n, cfg.num_perm, block=block)
    assert len(expected) > 50 and confirmed >= len(expected)
    assert near_of == expected


def test_low_byte_prefilter_never_confirms_a_pair_the_full_signatures_reject():
    # record 1 equals record 0 on every low byte, but on the full values only in 60% of them
    # (and on band 0): the prefilter passes it, the full signatures must reject it (0.6 < 0.8);
    # record 2 is a true near duplicate of record 0 (0.9)
    rng = np.random.default_rng(3)
    num_perm, bands, rows = 128, 21, 6
    base = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)
    fake = base.copy()
    changed = np.arange(rows, num_perm)[: int(0.4 * num_perm)]
    fake[changed] = fake[changed] ^ np.uint32(1 << 20)  # differs above the low byte only
    near = base.copy()
    near[-int(0.1 * num_perm):] ^= np.uint32(0xFF)
    sig = np.stack([base, fake, near])
    keys = dedup_module.band_keys(sig, bands, rows)
    recs = np.arange(3, dtype=np.int32)
    index = lsh_index.BucketIndex(np.zeros(3, bool), sig.astype(np.uint8), sig, bands, rows, 0.8,
                                  [(keys[:, k], recs) for k in range(bands)])
    assert (sig[1].astype(np.uint8) == sig[0].astype(np.uint8)).all()
    a, b, equal = index.pairs(0, 3, np.empty(0, np.int64))
    assert list(zip(a.tolist(), b.tolist())) == [(0, 2)]
    assert equal.tolist() == [num_perm - int(0.1 * num_perm)]


def _pair_at(base: np.ndarray, equal: int, flip: int, rows: int, seed: int) -> np.ndarray:
    """A copy of ``base`` equal to it on ``equal`` values (band 0 among them), the others
    changed by XOR with ``flip``."""
    other = base.copy()
    rng = np.random.default_rng(seed)
    changed = rng.choice(np.arange(rows, len(base)), size=len(base) - equal, replace=False)
    other[changed] ^= np.uint32(flip)
    return other


@pytest.mark.parametrize("num_perm", [128, 100])
@pytest.mark.parametrize("flip", [1, 1 << 4, 1 << 12], ids=["low-2-bits", "low-byte", "above-low-byte"])
def test_every_filter_passes_the_threshold_and_rejects_below(num_perm, flip):
    # pairs with exactly the fewest equal values that reach the threshold, and one fewer, their
    # other values differing in the low 2 bits (the 2-bit codes see it), above them in the low
    # byte (only the low bytes see it) or above the low byte (only the full signatures see it):
    # each filter is an upper bound, so the decision is the full signatures' in every case
    threshold = 0.8
    need = next(k for k in range(num_perm + 1) if k / num_perm >= threshold)
    bands, rows = lsh_params(threshold, num_perm)
    base = np.random.default_rng(7).integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)
    sig = np.stack([base, _pair_at(base, need, flip, rows, 1), _pair_at(base, need - 1, flip, rows, 2)])
    keys = dedup_module.band_keys(sig, bands, rows)
    recs = np.arange(3, dtype=np.int32)
    index = lsh_index.BucketIndex(np.zeros(3, bool), sig.astype(np.uint8), sig, bands, rows, threshold,
                                  [(keys[:, k], recs) for k in range(bands)])
    a, b, equal = index.pairs(0, 3, np.empty(0, np.int64))
    pairs = dict(zip(zip(a.tolist(), b.tolist()), equal.tolist()))
    assert pairs.get((0, 1)) == need
    assert (0, 2) not in pairs


@pytest.mark.parametrize("num_perm", [128, 100, 7])
def test_low_bit_codes_bound_the_equal_values(num_perm):
    rng = np.random.default_rng(num_perm)
    sig = rng.integers(0, 2**32, (200, num_perm), dtype=np.uint64).astype(np.uint32)
    sig[100:] = sig[:100]
    sig[100:, ::3] ^= rng.integers(1, 2**32, (100, len(range(0, num_perm, 3))), dtype=np.uint64).astype(np.uint32)
    codes = lsh_index.low_bit_codes(sig.astype(np.uint8))
    assert codes.shape == (200, -(-num_perm // 32)) and codes.dtype == np.uint64
    x = codes[:100] ^ codes[100:]
    differ = np.bitwise_count((x | (x >> np.uint64(1))) & np.uint64(0x5555555555555555)).sum(axis=1)
    assert (differ == ((sig[:100] & 3) != (sig[100:] & 3)).sum(axis=1)).all()  # padding never differs
    assert (differ <= (sig[:100] != sig[100:]).sum(axis=1)).all()


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint64])
def test_stable_argsort_is_numpys(dtype):
    rng = np.random.default_rng(11)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max, 50_000, dtype=dtype, endpoint=True)
    x[:20_000] = x[20_000:40_000]  # ties: positions must stay in order
    if dtype == np.int64:  # values sharing their top 32 bits, interleaved with others
        x[::7] = (x[::7] >> 32 << 32) | rng.integers(0, 4, len(x[::7]))
        x[1::7] = x[::7][: len(x[1::7])] ^ 1
    for v in (x, x[:0], x[:1], np.sort(x)[::-1].copy()):
        assert (lsh_index.stable_argsort(v) == np.argsort(v, kind="stable")).all()


def test_unique_ints_is_numpys():
    x = np.random.default_rng(2).integers(-50, 50, 10_000)
    assert (lsh_index.unique_ints(x) == np.unique(x)).all()
    assert len(lsh_index.unique_ints(x[:0])) == 0


def test_range_pairs_blocks_are_bounded_and_in_query_order():
    # every (partner, query) pair once, in query order, blocks never over the bound (a query's
    # range split across blocks where it must be)
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(0, 30))
        lo, count = rng.integers(0, 100, n), rng.integers(0, 12, n) * (rng.random(n) < 0.7)
        block = int(rng.integers(1, 20))
        want = [(int(lo[q]) + j, q) for q in range(n) for j in range(int(count[q]))]
        got = []
        for partner, query in lsh_index.range_pairs(lo, count, block):
            assert 0 < len(partner) <= block and len(partner) == len(query)
            got += zip(partner.tolist(), query.tolist())
        assert got == want


def test_source_spool_round_trips_ids_and_sources(tmp_path):
    """Pass 1's spool gives back every position's (id, source) exactly, whether added one record
    at a time (local engine) or as a signing task's joined lines (Ray engine)."""
    from llmpipe.data.dedup_report import SourceSpool, source_line

    records = [{"id": "a-1", "source": "tickets.jsonl"}, {"id": "ünï\u2028cödé"}, {"id": 7, "source": None},
               {"id": "q\"uote\\", "source": {"nested": [1, 2]}}, {"id": "", "source": "x" * 5000}]
    spool = SourceSpool(str(tmp_path))
    spool.add(records[0])
    lines = [source_line(r) for r in records[1:4]]
    spool.extend(b"".join(lines), np.array([len(x) for x in lines], np.int64))
    spool.add(records[4])
    assert len(spool) == len(records)
    assert [spool(i) for i in range(len(records))] == [(r.get("id"), r.get("source")) for r in records]
    for bad in (-1, len(records)):
        with pytest.raises(KeyError):
            spool(bad)
    spool.close()
    assert not list(tmp_path.iterdir())  # an unnamed file: nothing left behind
