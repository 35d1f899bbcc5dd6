"""pii-scrub KB of message text per CPU-second on the pii-long corpus, in one process, start-up
and scrubbing apart (on a shared box wall time is not the scrubber's; CPU seconds are).

    python benchmarks/pii_cpu_speed.py new 60
    python benchmarks/pii_cpu_speed.py worker 60   (start-up as a pool worker: no torch/transformers)
    PYTHONPATH=<checkout of the code before #12>/src python benchmarks/pii_cpu_speed.py old 60
      (old: reads the pre-#12 pii params from /tmp/pii_base/params.yaml)
"""
import json, os, resource, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import curation

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

mode, n = sys.argv[1], int(sys.argv[2])
recs = curation.make_long_records(n)
kb = curation.message_kb(recs)
import yaml
c0, w0 = cpu(), time.perf_counter()
from llmpipe.data import pii
if mode == "old":
    cfg = pii.PiiConfig.from_params(yaml.safe_load(open("/tmp/pii_base/params.yaml"))["pii"])
    s = pii.PiiScrubber(cfg)
else:
    from llmpipe.config.data import PiiSection
    cfg = PiiSection.model_validate(yaml.safe_load(open(curation.ROOT / "params.yaml"))["pii"])
    if mode == "worker":
        pii._worker_init(cfg)
        s = pii._WORKER
    else:
        s = pii.PiiScrubber(cfg)
        s.warm_up()
c1, w1 = cpu(), time.perf_counter()
res = pii.scrub_records(recs, cfg, progress=False, scrubber=s)
c2, w2 = cpu(), time.perf_counter()
print(json.dumps({"mode": mode, "records": n, "message_kb": round(kb, 1), "startup_cpu_s": round(c1 - c0, 2),
                  "scrub_cpu_s": round(c2 - c1, 2), "kb_per_cpu_s": round(kb / (c2 - c1), 1),
                  "records_per_cpu_s": round(n / (c2 - c1), 2), "wall_s": round(w2 - w0, 1),
                  "load": os.getloadavg()}))
