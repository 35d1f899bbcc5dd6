"""Where minhash-dedup's time goes on a records file: pass 1 (read, sign), then the exact pass,
the bucket index and the near pass (``lsh_index``), timed apart in one process, with the
candidate pairs the near pass looked at. The corpus files are curation_scale.py's
(``--make-corpus``); the numbers are in docs/curation.md ("minhash-dedup: the 2-bit filter").

    python benchmarks/near_pass.py /tmp/llmpipe-curation-scale/corpus-1000000.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a records file (pipeline JSONL, each record with an id)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = ap.parse_args()

    import numpy as np

    from llmpipe.config import load_params
    from llmpipe.data import dedup as D
    from llmpipe.data import lsh_index as L
    from llmpipe.data import records as canonical

    cfg = load_params(args.params).dedup
    candidates = [0]
    range_pairs = L.range_pairs

    def counted(lo, count, block=None):  # the near pass's candidate pairs, counted as they are made
        for partner, query in range_pairs(lo, count, block):
            candidates[0] += len(partner)
            yield partner, query

    L.range_pairs = counted
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=Path(args.path).parent) as work:
        signer = D._Signer(cfg, work, lambda _m: None)
        for file, lineno, line in canonical.iter_record_lines(args.path, D.DedupError):
            signer.add(canonical.parse_record(file, lineno, line, D.DedupError, require_id=True))
        signer.flush()
        t1 = time.perf_counter()
        cols, n = signer.cols, signer.n
        rep = D.exact_groups(cols.get("key"))
        skip = (rep != np.arange(n)) | np.asarray(cols.get("empty"))
        t2 = time.perf_counter()
        every = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
        index = L.BucketIndex(skip, cols.get("sig8"), cols.get("sig"), signer.bands, signer.rows, cfg.threshold,
                              [(cols.get(f"band{k}"), every) for k in range(signer.bands)])
        t3 = time.perf_counter()
        near_of, confirmed = L.near_pass(lambda lo, hi, removed: [index.pairs(lo, hi, removed)], n, cfg.num_perm)
        t4 = time.perf_counter()
    digest = hashlib.sha256(repr(sorted(near_of.items())).encode()).hexdigest()[:12]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"{n} records: pass 1 {t1 - t0:.1f} s, exact pass {t2 - t1:.1f} s, index {t3 - t2:.1f} s, "
          f"near pass {t4 - t3:.1f} s ({candidates[0]:,} candidate pairs, {confirmed:,} confirmed, "
          f"{len(near_of):,} near duplicates, decisions {digest}); peak RSS {peak} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
