"""Curation at scale: both engines (local, ray) on a generated corpus, with the same outputs.

Corpus: short support records (~400 characters, benchmarks/curation.py's generator: demo texts
with realistic PII and near duplicates) plus a share of long technical chats (4-9 KB of text,
benchmarks/pii_quality.py's generator) and 2% exact copies. Each (engine, stage, size) runs in
a fresh subprocess, which calls the stage's library function (the local one, or the Ray one
inside an embedded local Ray) on the corpus. Reported per run:

- seconds of the stage call (Ray start-up reported apart, as ``startup_seconds``),
  records/s and KB/s of message text;
- peak memory of all processes together (the run's process tree: driver, pool workers, Ray's
  GCS/raylet/workers), sampled every 0.5 s, as the sum of RSS and the sum of PSS (PSS counts a
  shared page, e.g. Ray's object store, once in all);
- the load average before and after (the box is shared: wall times are not idle-box times);
- a sha256 over the stage's outputs, so the results show both engines wrote the same bytes
  (for the file stages computed after the clock stops: reading the outputs back is not the
  stage's work, and ``digest_seconds`` says what it takes; until 2026-12-01 15:30 UTC it was
  timed too);
- for ``dedup-file``, ``counts.phase_seconds``: pass 1 (read, sign), the near pass (exact
  pass, bucket index, near pass), pass 2 (write the kept records) and the report (clusters and
  metrics written), timed from the stage's progress messages.

    nice -n 19 python benchmarks/curation_scale.py --sizes 10000 100000 --stages dedup split validate
    nice -n 19 python benchmarks/curation_scale.py --sizes 10000 --stages pii

The minhash-dedup *stage* at up to 1M records (``--stages dedup-file``): the corpus is written
once to a JSONL file (by a separate process, cached under ``--corpus-dir``), and the measured
process runs the stage's work on it -- read the file, deduplicate, write the kept records,
clusters and metrics -- so its memory holds no corpus the stage itself would not hold. Engines:
``local`` (``dedup_file``: two streaming passes, bounded memory), ``local-datasketch`` (the
local engine before it, loaded from git commit ``BASELINE_COMMIT``: all records in a list and
datasketch's MinHashLSH), ``ray`` (``dedup_file_ray``: the same two passes, signing and bucket
reduce as Ray tasks). The output digest
is computed as for the ``dedup`` rows, so the rows of all three compare.

    python benchmarks/curation_scale.py --stages dedup-file --engines local local-datasketch \\
        --sizes 10000 100000 1000000 --out benchmarks/results/curation_scale_dedup.json

``--corpus families`` (file stages only) writes and uses another corpus: the same long chats
and exact copies, but every short record's user turn is new text and one in ten is a near copy
of a recent short record, so its near-duplicate families keep their size as it grows (the
default ``pool`` corpus pairs 2,000 demo texts, so its families grow with it). Its rows go to
their own ``--out`` file.

The pii-scrub stage on a corpus file (``--stages pii-file``): ``scrub_file`` streams the file
through the scrubbers (pool workers, or Ray actors) into the output file, so its memory does not
grow with the records; digested as the ``pii`` rows.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "curation_scale.json"
STAGES = ("validate", "pii", "dedup", "split", "dedup-file", "pii-file")
ENGINES = ("local", "ray", "local-datasketch")
BASELINE_COMMIT = "43664f9"  # the last commit whose local minhash-dedup used datasketch's MinHashLSH
CORPUS_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "llmpipe-curation-scale"
LONG_SHARE = 0.02   # long technical chats among the records (every 50th)
EXACT_SHARE = 0.02  # exact copies of earlier records (every 50th)


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_curation", ROOT / "benchmarks" / "curation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def corpus(n: int) -> list[dict]:
    """n canonical records: short support records, with a long chat at every 50th position
    (k % 50 == 24) and an exact copy of the record 37 places back at every 50th (k % 50 == 49)."""
    from llmpipe.data.records import make_record

    bench = _bench_module()
    short = bench.make_records(n)
    long = bench.make_long_records(max(1, int(n * LONG_SHARE)))
    out = []
    for k in range(n):
        if k % 50 == 24:
            out.append(long[(k // 50) % len(long)])
        elif k % 50 == 49:
            src = out[k - 37]
            out.append(make_record(src["messages"], src["metadata"], {"file": "bench", "line": k + 1, "format": "messages"}))
        else:
            out.append(short[k])
    return out


def iter_corpus(n: int, kind: str = "pool"):
    """The ``kind`` corpus (``--corpus``) one record at a time, so a 1M-record corpus file is
    written without a list of 1M records: :func:`_pool_short` or :func:`_families_short` in
    :func:`_frame`."""
    yield from _frame(n, _families_short(n) if kind == "families" else _pool_short(n))


def _frame(n: int, short):
    """The corpus's frame: the long chat at k % 50 == 24, an exact copy of the record 37 places
    back at k % 50 == 49, and ``short(k)``'s record at the other positions. ``short(k)`` is
    called at every position, in order (the pool corpus draws its random numbers at every one)."""
    from collections import deque

    from llmpipe.data.records import make_record

    long = _bench_module().make_long_records(max(1, int(n * LONG_SHARE)))
    recent: deque = deque(maxlen=50)
    for k in range(n):
        rec = short(k)
        if k % 50 == 24:
            rec = long[(k // 50) % len(long)]
        elif k % 50 == 49:
            src = recent[-37]
            rec = make_record(src["messages"], src["metadata"], {"file": "bench", "line": k + 1, "format": "messages"})
        recent.append(rec)
        yield rec


def _short_record(k: int, user: str, reply: str) -> dict:
    from llmpipe.data.records import make_record
    from llmpipe.demo import support as demo

    msgs = [{"role": "system", "content": demo.SYSTEM_PROMPT},
            {"role": "user", "content": f"[{k}] {user}"},
            {"role": "assistant", "content": reply}]
    return make_record(msgs, {"intent": json.loads(reply)["intent"]}, {"file": "bench", "line": k + 1, "format": "messages"})


def _pool_short(n: int):
    """The ``pool`` corpus's short records (the records of :func:`corpus`, checked by
    ``--check-corpus``): two of the 2,000 demo texts, cut at 400 characters, as
    benchmarks/curation.py's ``make_records(n, seed=7, chars=400)``."""
    import random

    from llmpipe.demo import support as demo

    ds = demo.generate()
    texts = [e.user for e in ds.examples if e.kind == "base"]
    replies = [e.reply for e in ds.examples if e.kind == "base"]
    rng = random.Random(7)

    def short(k: int) -> dict | None:
        i, j = rng.randrange(len(texts)), rng.randrange(len(texts))
        if k % 50 in (24, 49):
            return None
        text = f"{texts[i]} Also: {texts[j]}"
        if len(text) > 400:
            text = text[: text.rfind(" ", 0, 400)]
        return _short_record(k, text, replies[i])

    return short


def _families_short(n: int):
    """The ``families`` corpus's short records: new text, 45-75 words drawn from 20,000 made-up
    words (2-4 syllables), and at k % 10 == 3 a near copy of one of the last 40 short records
    with 1-3 words changed. Its near-duplicate families keep their size as it grows (a copy's
    source is recent), so the work per record of an exact near pass should not grow with it."""
    import random
    from collections import deque

    from llmpipe.demo import support as demo

    replies = [e.reply for e in demo.generate().examples if e.kind == "base"]
    rng = random.Random(13)
    syllables = ["ka", "lo", "mi", "ter", "an", "sol", "ve", "ri", "pu", "don", "el", "sta", "ni", "gro", "ba",
                 "fi", "zu", "wen", "or", "li", "ce", "dra", "mo", "tik", "us", "pa", "ren", "go", "hal", "ex"]
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(40_000)})
    vocab = rng.sample(vocab, 20_000)
    recent: deque = deque(maxlen=40)

    def short(k: int) -> dict | None:
        if k % 50 in (24, 49):
            return None
        if k % 10 == 3 and recent:
            words, reply = rng.choice(recent)
            words = list(words)
            for pos in rng.sample(range(len(words)), rng.randint(1, 3)):
                words[pos] = rng.choice(vocab)
        else:
            words, reply = [rng.choice(vocab) for _ in range(rng.randint(45, 75))], rng.randrange(len(replies))
        recent.append((words, reply))
        return _short_record(k, " ".join(words), replies[reply])

    return short


def corpus_file(n: int, corpus_dir: Path, kind: str = "pool") -> Path:
    """The n-record corpus (``kind``: see ``--corpus``) as a pipeline records file (the form
    pii-scrub writes), made once by a separate process so that no measured process ever held
    the corpus."""
    path = corpus_dir / (f"corpus-{n}.jsonl" if kind == "pool" else f"corpus-{kind}-{n}.jsonl")
    if not path.exists():
        corpus_dir.mkdir(parents=True, exist_ok=True)
        print(f"[bench] writing {path}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--make-corpus", str(n), str(path), "--corpus", kind],
                       check=True, cwd=ROOT)
    return path


def _write_corpus(n: int, path: Path, kind: str = "pool") -> None:
    from llmpipe.io import jsonl_line, write_json, write_jsonl_lines

    kb = 0.0

    def lines():
        nonlocal kb
        for r in iter_corpus(n, kind):
            kb += sum(len(m["content"].encode("utf-8")) for m in r["messages"]) / 1000
            yield jsonl_line(r)

    write_jsonl_lines(path, lines())
    write_json(path.with_suffix(".json"), {"records": n, "message_kb": round(kb, 1)})


def file_digest(records_path: Path, clusters, metrics: dict) -> str:
    """:func:`digest` of (kept, clusters, metrics) with ``kept`` read line by line from the
    written records (each line is ``json.dumps(record, sort_keys=True, ensure_ascii=False)``, the
    element spelling of the list's JSON), so the dedup and dedup-file rows compare."""
    from llmpipe.data.records import iter_record_lines

    h = hashlib.sha256()
    h.update(b"[")
    for k, (_, _, line) in enumerate(iter_record_lines(records_path)):
        h.update((", " if k else "") .encode() + line.rstrip("\n").encode("utf-8", "surrogatepass"))
    h.update(b"]")
    h.update(b"[")  # the clusters' list spelt as json.dumps spells it, one cluster at a time
    for k, cluster in enumerate(clusters):
        h.update((", " if k else "").encode() + json.dumps(cluster, sort_keys=True, ensure_ascii=False, default=str)
                 .encode("utf-8", "surrogatepass"))
    h.update(b"]")
    h.update(json.dumps(metrics, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def baseline_dedup_module():
    """llmpipe.data.dedup as of BASELINE_COMMIT (datasketch MinHashLSH, all records in a list)."""
    import importlib.util

    src = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:src/llmpipe/data/dedup.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "dedup_datasketch.py"
    path.write_text(src, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("dedup_datasketch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class DedupPhases:
    """minhash-dedup's phases, timed from its progress messages (the same on both engines): pass 1
    (read and sign) ends at "exact pass:", the near pass (exact pass, bucket index, near pass)
    at its last "near pass: ... confirmed pairs" line, pass 2 (write the kept records) at
    "kept ..."; the report is the cluster report and metrics written after."""

    MARKS = (("pass1", lambda m: m.startswith("exact pass:")),
             ("near_pass", lambda m: m.startswith("near pass:") and "confirmed pairs" in m and "records," not in m),
             ("pass2", lambda m: m.startswith("kept ")))

    def __init__(self) -> None:
        self.start, self.at = time.perf_counter(), {}

    def __call__(self, msg: str) -> None:
        for name, seen in self.MARKS:
            if name not in self.at and seen(msg):
                self.at[name] = time.perf_counter()

    def seconds(self) -> dict[str, float]:
        """Seconds per phase, the report's up to now (empty if a mark was never seen)."""
        if len(self.at) != len(self.MARKS):
            return {}
        ends = [self.at[name] for name, _ in self.MARKS] + [time.perf_counter()]
        starts = [self.start] + ends[:-1]
        return {name: round(e - b, 2) for name, b, e in zip([n for n, _ in self.MARKS] + ["report"], starts, ends)}


def run_dedup_file(engine: str, corpus: Path, params, tmp: Path) -> tuple[str, dict]:
    """The minhash-dedup stage's work on a corpus file: read, deduplicate, write outputs."""
    from llmpipe.io import write_json, write_jsonl

    out = tmp / "dedup" / "records.jsonl"
    phases = DedupPhases()
    if engine == "local":
        from llmpipe.data.dedup import dedup_file

        clusters, metrics = dedup_file(corpus, out, params.dedup, progress=phases)
    elif engine == "local-datasketch":
        old = BASELINE
        records = old.read_records(str(corpus))
        kept, clusters, metrics = old.dedup_records(records, params.dedup)
        del records
        write_jsonl(out, kept)
        del kept
    else:
        from llmpipe.curation.ray_dedup import dedup_file_ray

        clusters, metrics = dedup_file_ray(corpus, out, params.dedup, params.curation, progress=phases)
    write_jsonl(tmp / "dedup" / "clusters.jsonl", clusters)
    write_json(tmp / "dedup" / "dedup.json", metrics)
    counts = {"kept": metrics["records_out"], "exact": metrics["exact_duplicates_removed"],
              "near": metrics["near_duplicates_removed"]}
    if took := phases.seconds():
        counts["phase_seconds"] = took
    return (lambda: file_digest(out, clusters, metrics)), counts


BASELINE = None


def message_kb(records: list[dict]) -> float:
    return sum(len(m["content"].encode("utf-8")) for r in records for m in r["messages"]) / 1000


class TreeMemory:
    """Peak sum of RSS and of PSS over this process and all its descendants."""

    def __init__(self, every_s: float = 0.5):
        import psutil

        self.me = psutil.Process()
        self.every_s = every_s
        self.peak_rss = self.peak_pss = 0
        self.cpu: dict[int, float] = {}  # pid -> user+system seconds when last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        rss = pss = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            with_cpu = p.cpu_times()
            self.cpu[p.pid] = with_cpu.user + with_cpu.system
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the tree (every process as last seen)."""
        self._sample()
        return sum(self.cpu.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def run_stage(engine: str, stage: str, records: list[dict], params, tmp: Path) -> tuple[str, dict]:
    """Run one stage with one engine; returns (output digest, a few counts)."""
    ray = engine == "ray"
    if stage == "validate":
        from llmpipe.data.validate import (
            TokenCounter,
            ValidateOutputs,
            Validator,
            local_batch_map,
            validate_files,
        )
        from llmpipe.model.source import load_tokenizer

        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps({"messages": r["messages"], "metadata": r["metadata"]}, ensure_ascii=False) + "\n")
        # a relative path: records name their source file, and the digests must not see tmp's name
        cfg = params.validate_.model_copy(update={"inputs": ["corpus.jsonl"]})
        out = ValidateOutputs("out/records.jsonl", "out/rejects.jsonl", "out/repairs.jsonl")
        cwd = os.getcwd()
        os.chdir(tmp)
        try:  # the stage's work: stream the input file through the validators into the output files
            counter = TokenCounter(load_tokenizer(params.model.name_or_path))  # as the stage: both engines
            if ray:
                from llmpipe.curation.ray_validate import ray_batch_map

                batch_map = ray_batch_map(cfg, params.model.max_seq_len, counter.tokenizer, params.curation.workers)
                batch_size = params.curation.batch_size
            else:
                batch_map, batch_size = local_batch_map(Validator(cfg, params.model.max_seq_len, counter)), 1
            metrics = validate_files(cfg, out, batch_map, batch_size, 1).metrics
            # digest(records, rejects, repairs, metrics) of the lists, from the files: each line is
            # the element spelling of the list's JSON
            h = hashlib.sha256()
            for path in (out.records, out.rejects, out.repairs):
                with open(path, encoding="utf-8", newline="\n") as fh:
                    h.update(b"[")
                    for k, line in enumerate(fh):
                        h.update((", " if k else "").encode() + line.rstrip("\n").encode("utf-8"))
                    h.update(b"]")
            h.update(json.dumps(metrics, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
        finally:
            os.chdir(cwd)
        return h.hexdigest(), {"valid": metrics["records_valid"], "rejected": metrics["records_rejected"]}
    if stage == "pii":
        if ray:
            from llmpipe.curation.ray_pii import ray_batch_map
            from llmpipe.data.pii import scrub_records

            out, metrics, review = scrub_records(records, params.pii, progress=False,
                                                 batch_map=ray_batch_map(params.pii))
        else:
            from llmpipe.data.pii import scrub_records

            out, metrics, review = scrub_records(records, params.pii, progress=False)
        return digest(out, metrics, review), {"touched": metrics["records_touched"], "workers": params.pii.workers}
    if stage == "dedup":
        if ray:  # the Ray engine streams a file: the records written first (not timed apart)
            from llmpipe.curation.ray_dedup import dedup_file_ray
            from llmpipe.io import write_records

            write_records(tmp / "in.jsonl", records)
            clusters, metrics = dedup_file_ray(tmp / "in.jsonl", tmp / "out.jsonl", params.dedup, params.curation)
            return file_digest(tmp / "out.jsonl", clusters, metrics), {
                "kept": metrics["records_out"], "exact": metrics["exact_duplicates_removed"],
                "near": metrics["near_duplicates_removed"]}
        from llmpipe.data.dedup import dedup_records

        kept, clusters, metrics = dedup_records(records, params.dedup)
        return digest(kept, clusters, metrics), {"kept": len(kept), "exact": metrics["exact_duplicates_removed"],
                                                 "near": metrics["near_duplicates_removed"]}
    if stage == "split":  # the stage's work on a file (written here, by both engines): read, split, write
        from llmpipe.data.split import SPLITS, split_file
        from llmpipe.io import read_jsonl, sha256_file, write_records

        write_records(tmp / "records.jsonl", records)
        batch_map, batch_size = None, {}
        if ray:
            from llmpipe.curation.ray_split import ray_batch_map

            batch_map, batch_size = ray_batch_map(params.split, params.curation), {"batch_size": params.curation.batch_size}
        metrics = split_file(tmp / "records.jsonl", tmp / "split", params.split, batch_map=batch_map, **batch_size)
        files = {s: sha256_file(tmp / "split" / f"{s}.jsonl") for s in SPLITS}
        contamination = list(read_jsonl(tmp / "split" / "contamination.jsonl"))
        return digest(files, contamination, metrics), {"contamination_pairs": metrics["contamination_pairs"]}
    raise SystemExit(f"unknown stage {stage}")


def measure(engine: str, params, work, tmp_root: Path | None = None) -> dict:
    """Run ``work(tmp_dir) -> (digest, counts)`` once under ``engine``'s session (Ray started
    before the timer) and measure it: wall and CPU seconds of the whole process tree, peak memory,
    the load average before and after. ``digest`` may be a function, called once the clock has
    stopped (reading the outputs back is not the stage's work)."""
    import contextlib

    load_before = os.getloadavg()
    with TreeMemory() as mem, tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        t0 = time.perf_counter()
        if engine == "ray":
            from llmpipe.curation.ray_runtime import ray_session

            session = ray_session(params.curation.model_copy(update={"engine": "ray"}))
        else:
            session = contextlib.nullcontext("local")
        with session as where:
            startup = time.perf_counter() - t0
            cpu1 = mem.cpu_seconds()
            t1 = time.perf_counter()
            digest_, counts = work(Path(tmp))
            seconds = time.perf_counter() - t1
            cpu = mem.cpu_seconds() - cpu1
            digest_seconds = None
            if callable(digest_):
                t2 = time.perf_counter()
                digest_ = digest_()
                digest_seconds = round(time.perf_counter() - t2, 3)
    return {"where": where, "seconds": seconds, "startup_seconds": round(startup, 3), "cpu": cpu,
            "peak_rss": mem.peak_rss, "peak_pss": mem.peak_pss, "load_before": load_before,
            "digest": digest_, "counts": counts, "digest_seconds": digest_seconds}


def rates(m: dict, n: int) -> dict:
    """The CPU, memory, load and output fields of a result row."""
    # on the shared box wall time measures the neighbours too; CPU seconds of the whole
    # process tree (Ray's own processes included) do not
    return {"cpu_seconds": round(m["cpu"], 2), "records_per_cpu_s": round(n / m["cpu"], 1),
            "peak_rss_sum_mb": round(m["peak_rss"] / 2**20, 1), "peak_pss_sum_mb": round(m["peak_pss"] / 2**20, 1),
            "load_before": [round(x, 2) for x in m["load_before"]],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "output_sha256": m["digest"], "counts": m["counts"],
            **({"digest_seconds": m["digest_seconds"]} if m.get("digest_seconds") is not None else {})}


def run_pii_file(engine: str, corpus: Path, params, tmp: Path) -> tuple[str, dict]:
    """The pii-scrub stage's work on a corpus file (``scrub_file``: stream in, scrub, stream out),
    digested as the ``pii`` rows are."""
    from llmpipe.data.pii import scrub_file

    out = tmp / "scrubbed" / "records.jsonl"
    batch_map = None
    if engine == "ray":
        from llmpipe.curation.ray_pii import ray_batch_map

        batch_map = ray_batch_map(params.pii)
    res = scrub_file(corpus, out, params.pii, progress=False, batch_map=batch_map)
    return (lambda: file_digest(out, res.metrics, res.review)), {"touched": res.metrics["records_touched"],
                                                                 "workers": params.pii.workers}


def run_one_file(engine: str, stage: str, n: int, params, corpus_dir: Path, kind: str = "pool") -> dict:
    """One dedup-file or pii-file measurement in this process (the corpus file exists already)."""
    global BASELINE
    path = corpus_file(n, corpus_dir, kind)
    import llmpipe.data.dedup, llmpipe.data.pii  # noqa: E401,F401  imports are not the stage's work
    if engine == "local-datasketch":
        BASELINE = baseline_dedup_module()
    if engine == "ray":
        import ray  # noqa: F401

        import llmpipe.curation.ray_dedup, llmpipe.curation.ray_pii  # noqa: E401,F401
    run = run_dedup_file if stage == "dedup-file" else run_pii_file
    file_mb = path.stat().st_size / 2**20
    kb = json.loads(path.with_suffix(".json").read_text())["message_kb"]
    m = measure(engine, params, lambda tmp: run(engine, path, params, tmp), tmp_root=corpus_dir)
    seconds = m["seconds"]
    return {"engine": engine, "stage": stage, "records": n, "where": m["where"],
            "seconds": round(seconds, 3), "startup_seconds": m["startup_seconds"],
            "records_per_s": round(n / seconds, 1), "message_kb": kb, "kb_per_s": round(kb / seconds, 1),
            "input_mb": round(file_mb, 1), "input_mb_per_s": round(file_mb / seconds, 2),
            **rates(m, n)}


def run_one(engine: str, stage: str, n: int, corpus_dir: Path = CORPUS_DIR, kind: str = "pool") -> dict:
    from llmpipe.config import load_params

    params = load_params(ROOT / "params.yaml")
    if stage in ("dedup-file", "pii-file"):
        return run_one_file(engine, stage, n, params, corpus_dir, kind)
    records = corpus(n)
    # imports are not the stage's work: load every module either engine uses before timing
    import llmpipe.data.dedup, llmpipe.data.pii, llmpipe.data.split, llmpipe.data.validate  # noqa: E401,F401
    if engine == "ray":
        import ray  # noqa: F401

        import llmpipe.curation.ray_dedup, llmpipe.curation.ray_pii, llmpipe.curation.ray_split  # noqa: E401,F401
        import llmpipe.curation.ray_validate  # noqa: F401
    kb = message_kb(records)
    m = measure(engine, params, lambda tmp: run_stage(engine, stage, records, params, tmp))
    seconds = m["seconds"]
    return {"engine": engine, "stage": stage, "records": n, "where": m["where"], "seconds": round(seconds, 3),
            "startup_seconds": m["startup_seconds"], "records_per_s": round(n / seconds, 1),
            "message_kb": round(kb, 1), "kb_per_s": round(kb / seconds, 1), **rates(m, n)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--one", nargs=3, metavar=("ENGINE", "STAGE", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--make-corpus", nargs=2, metavar=("N", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--check-corpus", type=int, metavar="N", help="check iter_corpus(N) == corpus(N) and exit")
    ap.add_argument("--corpus-dir", default=str(CORPUS_DIR), help="where dedup-file corpus files are cached")
    ap.add_argument("--corpus", default="pool", choices=("pool", "families"),
                    help="pool: short records pair 2,000 demo texts, so families of similar records grow with the "
                         "corpus; families: new text per record and near copies of recent ones, families of a "
                         "fixed size (file stages only)")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON; rows are merged by (engine, stage, records)")
    args = ap.parse_args()

    if args.make_corpus:
        _write_corpus(int(args.make_corpus[0]), Path(args.make_corpus[1]), args.corpus)
        return 0
    if args.check_corpus:
        same = list(iter_corpus(args.check_corpus)) == corpus(args.check_corpus)
        print(f"iter_corpus({args.check_corpus}) == corpus({args.check_corpus}): {same}")
        return 0 if same else 1
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], int(args.one[2]), Path(args.corpus_dir), args.corpus)))
        return 0

    if args.corpus != "pool" and set(args.stages) - {"dedup-file", "pii-file"}:
        ap.error("--corpus families is for the file stages (dedup-file, pii-file)")
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"benchmark": "curation_scale", "results": []}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    result["corpus"] = {"kind": args.corpus, "short_record_chars": 400, "long_share": LONG_SHARE,
                        "exact_copy_share": EXACT_SHARE}
    if result.get("corpus_kind", args.corpus) != args.corpus:
        ap.error(f"{out} holds rows of the {result['corpus_kind']} corpus: give another --out")
    result["corpus_kind"] = args.corpus
    for n in args.sizes:
        for stage in args.stages:
            for engine in args.engines:
                runs = []
                for r in range(args.repeats):
                    print(f"[bench] {engine} {stage} x {n}, run {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
                    if stage in ("dedup-file", "pii-file"):
                        corpus_file(n, Path(args.corpus_dir), args.corpus)  # made outside the measured process
                    proc = subprocess.run([sys.executable, __file__, "--one", engine, stage, str(n),
                                           "--corpus-dir", args.corpus_dir, "--corpus", args.corpus],
                                          capture_output=True, text=True, cwd=ROOT)
                    if proc.returncode != 0:
                        print(proc.stderr[-3000:], file=sys.stderr)
                        return 1
                    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                med = statistics.median(x["seconds"] for x in runs)
                row = {"engine": engine, "stage": stage, "records": n, "repeats": len(runs),
                       "median_seconds": med, "median_records_per_s": round(n / med, 1),
                       "median_kb_per_s": round(runs[0]["message_kb"] / med, 1),
                       "median_cpu_seconds": statistics.median(x["cpu_seconds"] for x in runs),
                       "peak_pss_sum_mb": max(x["peak_pss_sum_mb"] for x in runs),
                       "peak_rss_sum_mb": max(x["peak_rss_sum_mb"] for x in runs),
                       "output_sha256": runs[0]["output_sha256"], "runs": runs}
                result["results"] = [x for x in result["results"]
                                     if (x["engine"], x["stage"], x["records"]) != (engine, stage, n)] + [row]
                print(f"[bench] {engine:5s} {stage:8s} {n:>8d}: {row['median_records_per_s']:>9.1f} rec/s "
                      f"{row['median_kb_per_s']:>8.1f} KB/s, {row['median_cpu_seconds']} CPU-s, peak PSS {row['peak_pss_sum_mb']} MB "
                      f"(RSS sum {row['peak_rss_sum_mb']} MB), load {runs[-1]['load_after'][0]}",
                      file=sys.stderr, flush=True)
                result["time_exponents"] = time_exponents(result["results"])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def time_exponents(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per (engine, stage): k in seconds ~ records**k between each pair of measured sizes
    (1: linear), from the median seconds."""
    import math

    out: dict[str, dict[str, float]] = {}
    for engine, stage in sorted({(r["engine"], r["stage"]) for r in rows}):
        sized = sorted((r["records"], r["median_seconds"]) for r in rows if (r["engine"], r["stage"]) == (engine, stage))
        for (n1, t1), (n2, t2) in ((a, b) for i, a in enumerate(sized) for b in sized[i + 1:]):
            out.setdefault(f"{engine} {stage}", {})[f"{n1}->{n2}"] = round(math.log(t2 / t1) / math.log(n2 / n1), 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
