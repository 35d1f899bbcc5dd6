"""DVC stage `gate`: check metrics/eval.json against the thresholds in params.yaml `gate:`.

in:  metrics/eval.json, params gate.*
out: metrics/gate.json (passed, verdict, every check with value, threshold, comparison, verdict),
     reports/gate.md (markdown for PR reviews)

Exit code: 0 whether the gate passes or fails. The verdict is data, like every other metric:
`dvc repro` must finish so reviewers see the failing numbers in `dvc metrics diff`, and a failed
experiment must still be recorded by `dvc exp run`. What a failing gate blocks is promotion
(`llmpipe promote` refuses unless metrics/gate.json has `passed: true`). Use `--strict` (e.g. in
a CI job that should go red) to exit 1 on a failing gate. Bad input (missing metrics, malformed
thresholds) always exits 2.
"""

from __future__ import annotations

import argparse
import sys

from llmpipe.config import ParamsError, load_stage_params
from llmpipe.gate import GateError, run_gate
from llmpipe.io import atomic_path, write_json

PARAMS = ["gate"]  # = this stage's params: in dvc.yaml


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None, help="params file (default: params.yaml)")
    ap.add_argument("--eval-metrics", default="metrics/eval.json")
    ap.add_argument("--out", default="metrics/gate.json")
    ap.add_argument("--report", default="reports/gate.md")
    ap.add_argument("--strict", action="store_true", help="exit 1 when the gate fails")
    args = ap.parse_args(argv)
    try:
        cfg = load_stage_params(PARAMS, args.params)
        result, report = run_gate(args.eval_metrics, cfg.gate)
    except (ParamsError, GateError) as exc:
        print(f"[gate] error: {exc}", file=sys.stderr)
        return 2
    write_json(args.out, result)
    with atomic_path(args.report) as tmp:
        tmp.write_text(report, encoding="utf-8")
    for c in result["checks"]:
        print(f"[gate] {'pass' if c['passed'] else 'FAIL'} {c['name']}: {c['reason']}", file=sys.stderr)
    print(f"[gate] verdict: {result['verdict'].upper()} -> {args.out}, {args.report}", file=sys.stderr)
    if args.strict and not result["passed"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
