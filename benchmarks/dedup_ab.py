"""A/B of minhash-dedup's local engine between two source trees, in alternating fresh
processes, so that the box's drift between runs minutes apart hits both sides alike.

Each run calls ``dedup_file`` on a corpus file (curation_scale.py's ``--make-corpus``) with
``PYTHONPATH`` set to one tree's ``src`` and prints the seconds from the start at which pass 1
ended (``p1``: the "exact pass" progress line), pass 2 ended (``all``: the "kept ..." line), and
the cluster report was built and iterated (``report``, ``written``).

    git worktree add /tmp/old-34d88be 34d88be
    python benchmarks/dedup_ab.py /tmp/llmpipe-curation-scale/corpus-1000000.jsonl 2 \
        /tmp/old-34d88be/src src > benchmarks/results/dedup_ab_34d88be_1m.txt

(2026-12-01 16:42-16:55 UTC: the pass-1 spool against the code before it.)
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

code = r'''
import sys, time, tempfile
from llmpipe.config import load_params
from llmpipe.data import dedup as D
cfg = load_params(sys.argv[2]).dedup
marks = {}
t0 = time.perf_counter()
def say(m):
    if m.startswith("exact pass:") and "p1" not in marks: marks["p1"] = time.perf_counter() - t0
    if m.startswith("kept ") and "all" not in marks: marks["all"] = time.perf_counter() - t0
with tempfile.TemporaryDirectory(dir=sys.argv[3]) as d:
    cl, m = D.dedup_file(sys.argv[1], d + "/out.jsonl", cfg, progress=say)
    marks["report"] = time.perf_counter() - t0
    n = sum(1 for _ in cl)
    marks["written"] = time.perf_counter() - t0
print(marks)
'''


def main() -> int:
    path, repeats, old, new = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    work = str(Path(path).resolve().parent)
    for _ in range(repeats):
        for name, src in (("old", old), ("new", new)):
            env = {"PYTHONPATH": str(Path(src).resolve()), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
            out = subprocess.run([sys.executable, "-c", code, path, str(ROOT / "params.yaml"), work],
                                 env=env, capture_output=True, text=True)
            print(name, out.stdout.strip() or out.stderr[-500:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
