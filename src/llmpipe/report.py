"""PR report: one Markdown comment comparing the pipeline's results at two revisions.

What a reviewer needs on a pull request, in the order they read it: the gate verdict, the
headline metrics (data counts, train/val loss, task accuracy, format compliance, lm-eval drop,
safety) base vs head, the params that changed, the gate table, and plots (training/validation
loss, eval per system) as Mermaid charts, which GitHub renders inside a comment with no image
hosting. Every other changed metric follows in a collapsed section.

Everything is read from files the pipeline commits to git (metrics/*.json, params.yaml, the
dvclive plot TSVs), so the base can be any git revision (a branch, a tag, a commit, an
experiment ref) and the head either a revision or the workspace after ``dvc repro``. No DVC
import: the report works on any checkout, even one whose DVC cache was never pulled.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS_DIR = "metrics"
PARAMS_FILE = "params.yaml"
LOSS_PLOTS = {"train": "dvclive/train/plots/metrics/train/loss.tsv",
              "val": "dvclive/train/plots/metrics/eval/loss.tsv"}
# GitHub rejects comments longer than 65,536 characters; the collapsed section is cut first.
MAX_CHARS = 60_000
MAX_DETAIL_ROWS = 150

# (section, label, metrics file, dotted key, format, direction): direction +1 = higher is
# better, -1 = lower is better, 0 = neither (a count). Missing keys show as "-".
HEADLINE: list[tuple[str, str, str, str, str, int]] = [
    ("data", "records after curation", "data.json", "records", "d", 0),
    ("data", "train / val / test", "data.json", "counts", "counts", 0),
    ("data", "rejected by validate", "validate.json", "records_rejected", "d", 0),
    ("data", "duplicates removed (exact + near)", "dedup.json",
     "exact_duplicates_removed+near_duplicates_removed", "d", 0),
    ("data", "val/test records near-duplicating train", "data.json", "contaminated_records", "d", -1),
    ("training", "train loss (last logged)", "train.json", "train_loss", ".4f", -1),
    ("training", "val loss", "train.json", "val_loss", ".4f", -1),
    ("training", "steps", "train.json", "steps", "d", 0),
    ("task", "task accuracy, tuned", "eval.json", "task.tuned.task_accuracy", ".3f", 1),
    ("task", "all-fields exact match, tuned", "eval.json", "task.tuned.exact_match", ".3f", 1),
    ("task", "format compliance, tuned", "eval.json", "task.tuned.format_compliance", ".3f", 1),
    ("task", "task accuracy, base few-shot", "eval.json", "task.base_few_shot.task_accuracy", ".3f", 0),
    ("task", "margin over few-shot", "eval.json", "task.margin_over_few_shot", ".3f", 1),
    ("lm-eval", "mean drop vs base (points)", "eval.json", "lm_eval.drop_points", ".2f", -1),
    ("lm-eval", "worst task drop (points)", "eval.json", "lm_eval.max_task_drop_points", ".2f", -1),
    ("safety", "refusal rate, harmful requests", "eval.json", "safety.tuned.refusal_rate", ".3f", 1),
    ("safety", "over-refusal rate, benign controls", "eval.json", "safety.tuned.over_refusal_rate", ".3f", -1),
    ("gate", "checks failed", "gate.json", "n_failed", "d", -1),
]

SYSTEMS = [("base, zero-shot", "base_zero_shot"), ("base, few-shot", "base_few_shot"), ("tuned", "tuned")]


class ReportError(RuntimeError):
    """A revision or file needed for the report cannot be read."""


@dataclass
class Snapshot:
    """The committed results of one revision (``rev`` None: the workspace)."""

    label: str
    metrics: dict[str, Any] = field(default_factory=dict)   # file name -> parsed JSON
    params: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # train/val -> (step, loss)


# -- reading ---------------------------------------------------------------------------------
def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60)


def resolve_rev(repo: Path, rev: str) -> str:
    """Commit of a git revision, or of a DVC experiment by name (its ref under refs/exps/)."""
    proc = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if proc.returncode == 0:
        return proc.stdout.strip()
    refs = _git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps/").stdout.split("\n")
    found = [line.split()[0] for line in refs if line.endswith(f"/{rev}")]
    if len(found) == 1:
        return found[0]
    raise ReportError(f"'{rev}' is neither a git revision nor a single experiment in {repo} "
                      "(in CI, fetch it first: git fetch origin <branch>; dvc exp pull origin <name>)")


def _reader(repo: Path, rev: str | None):
    """(list_metrics, read_text) for a git revision or the workspace."""
    if rev is None:
        def list_metrics() -> list[str]:
            return sorted(p.name for p in (repo / METRICS_DIR).glob("*.json"))

        def read(rel: str) -> str | None:
            p = repo / rel
            return p.read_text(encoding="utf-8") if p.is_file() else None
        return list_metrics, read

    sha = resolve_rev(repo, rev)

    def list_metrics() -> list[str]:
        out = _git(repo, "ls-tree", "--name-only", sha, f"{METRICS_DIR}/").stdout
        return sorted(Path(line).name for line in out.splitlines() if line.endswith(".json"))

    def read(rel: str) -> str | None:
        p = _git(repo, "show", f"{sha}:{rel}")
        return p.stdout if p.returncode == 0 else None
    return list_metrics, read


def _parse_loss(text: str | None) -> list[tuple[float, float]]:
    if not text:
        return []
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    return [(float(r["step"]), float(r["loss"])) for r in rows if r.get("step") and r.get("loss")]


def load_snapshot(repo: str | Path, rev: str | None, label: str | None = None) -> Snapshot:
    """Metrics, params and loss curves of ``rev`` (None: the files in the workspace)."""
    repo = Path(repo)
    list_metrics, read = _reader(repo, rev)
    snap = Snapshot(label or (rev if rev else "workspace"))
    for name in list_metrics():
        rel = f"{METRICS_DIR}/{name}"
        try:
            snap.metrics[name] = json.loads(read(rel) or "null")
        except json.JSONDecodeError as exc:
            raise ReportError(f"{rel} at {snap.label}: line {exc.lineno}: invalid JSON ({exc.msg})") from exc
    try:
        snap.params = yaml.safe_load(read(PARAMS_FILE) or "") or {}
    except yaml.YAMLError as exc:
        raise ReportError(f"{PARAMS_FILE} at {snap.label}: invalid YAML ({exc})") from exc
    snap.loss = {name: _parse_loss(read(path)) for name, path in LOSS_PLOTS.items()}
    return snap


# -- values ----------------------------------------------------------------------------------
def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def metric(snap: Snapshot, file: str, key: str) -> Any:
    data = snap.metrics.get(file)
    if "+" in key:  # a sum of keys, e.g. exact + near duplicates
        parts = [_get(data, k) for k in key.split("+")]
        return sum(parts) if all(isinstance(p, (int, float)) for p in parts) else None
    return _get(data, key)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': leaf}; lists are leaves (a changed list shows whole)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if spec == "counts" and isinstance(v, dict):
        return " / ".join(str(v.get(k, "-")) for k in ("train", "val", "test"))
    if _num(v) and spec:
        return format(v, spec)
    if isinstance(v, float):
        return f"{v:.4g}"
    text = json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)
    return text if len(text) <= 60 else text[:57] + "..."


def change(base: Any, head: Any, spec: str = "", direction: int = 0) -> str:
    """'+0.012 (better)', '+180 / +0 / +0' for split counts, 'changed', '' when equal."""
    if base == head:
        return ""
    if spec == "counts" and isinstance(base, dict) and isinstance(head, dict):
        return " / ".join(change(base.get(k), head.get(k)) or "+0" for k in ("train", "val", "test"))
    if _num(base) and _num(head):
        delta = head - base
        text = format(delta, "+" + spec) if spec and spec != "counts" else f"{delta:+.4g}"
        if direction:
            text += " (better)" if delta * direction > 0 else " (worse)"
        return text
    return "added" if base is None else "removed" if head is None else "changed"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# -- sections --------------------------------------------------------------------------------
def _verdict(snap: Snapshot) -> str:
    gate = snap.metrics.get("gate.json")
    if not isinstance(gate, dict) or "passed" not in gate:
        return "no gate result"
    checks = gate.get("checks") or []
    ok = sum(1 for c in checks if isinstance(c, dict) and c.get("passed"))
    return f"{'PASS' if gate['passed'] else 'FAIL'} ({ok}/{len(checks)} checks pass)"


def headline_table(base: Snapshot, head: Snapshot) -> list[str]:
    lines = [f"| | metric | {_cell(base.label)} | {_cell(head.label)} | change |", "|---|---|---|---|---|"]
    for section, label, file, key, spec, direction in HEADLINE:
        b, h = metric(base, file, key), metric(head, file, key)
        if b is None and h is None:
            continue
        lines.append(f"| {section} | {label} | {fmt(b, spec)} | {fmt(h, spec)} | {change(b, h, spec, direction)} |")
    lines.append(f"| gate | verdict | {_verdict(base)} | {_verdict(head)} | "
                 f"{'' if _verdict(base) == _verdict(head) else 'changed'} |")
    return lines


def params_table(base: Snapshot, head: Snapshot) -> list[str]:
    fb, fh = flatten(base.params), flatten(head.params)
    keys = sorted(k for k in set(fb) | set(fh) if fb.get(k, ...) != fh.get(k, ...))
    if not keys:
        return ["No params changed."]
    lines = [f"| param | {_cell(base.label)} | {_cell(head.label)} |", "|---|---|---|"]
    for k in keys:
        b = fmt(fb[k]) if k in fb else "(absent)"
        h = fmt(fh[k]) if k in fh else "(absent)"
        lines.append(f"| `{k}` | {_cell(b)} | {_cell(h)} |")
    return lines


def gate_table(base: Snapshot, head: Snapshot) -> list[str]:
    hg, bg = head.metrics.get("gate.json"), base.metrics.get("gate.json") or {}
    if not isinstance(hg, dict) or not hg.get("checks"):
        return [f"No gate result at {head.label} (metrics/gate.json)."]
    bchecks = {c.get("name"): c for c in (bg.get("checks") or []) if isinstance(c, dict)}
    lines = [f"| check | {_cell(base.label)} | {_cell(head.label)} | threshold | verdict | what |",
             "|---|---|---|---|---|---|"]
    for c in hg["checks"]:
        b = bchecks.get(c.get("name"), {})
        unit = f" {c['unit']}" if c.get("unit") else ""
        verdict = "pass" if c.get("passed") else "**FAIL**"
        if b and bool(b.get("passed")) != bool(c.get("passed")):
            verdict += f" (was {'pass' if b.get('passed') else 'fail'})"
        lines.append(f"| {c.get('name')} | {fmt(b.get('value'), '.3f') if b else '-'} | "
                     f"{fmt(c.get('value'), '.3f')} | {c.get('op', '')} {fmt(c.get('threshold'), '.3f')}{unit} | "
                     f"{verdict} | {_cell(str(c.get('description', '')))} |")
    return lines


def _series(points: list[tuple[float, float]], steps: list[float]) -> list[float]:
    """``points`` sampled at ``steps`` (last value at or before each step; first value before)."""
    out, i, last = [], 0, points[0][1]
    for s in steps:
        while i < len(points) and points[i][0] <= s:
            last = points[i][1]
            i += 1
        out.append(round(last, 4))
    return out


def _mermaid_lines(title: str, curves: list[tuple[str, list[tuple[float, float]]]], y_label: str) -> list[str]:
    curves = [(name, pts) for name, pts in curves if pts]
    if not curves:
        return []
    steps = sorted({s for _, pts in curves for s, _ in pts})
    if len(steps) > 40:  # keep the chart readable: at most 40 x positions
        stride = -(-len(steps) // 40)
        steps = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
    values = [v for _, pts in curves for _, v in pts]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or 0.05
    lines = ["```mermaid", "xychart-beta", f'    title "{title}"',
             f"    x-axis \"step\" [{', '.join(str(int(s)) for s in steps)}]",
             f'    y-axis "{y_label}" {max(0.0, lo - pad):.3f} --> {hi + pad:.3f}']
    for _, pts in curves:
        lines.append(f"    line [{', '.join(str(v) for v in _series(pts, steps))}]")
    lines.append("```")
    legend = ", ".join(f"line {i + 1} = {name}" for i, (name, _) in enumerate(curves))
    return lines + [f"<sub>{legend}</sub>"]


def plots(base: Snapshot, head: Snapshot) -> list[str]:
    out: list[str] = []
    for kind in ("train", "val"):
        out += _mermaid_lines(f"{kind} loss", [(base.label, base.loss.get(kind, [])),
                                               (head.label, head.loss.get(kind, []))], "loss")
        out.append("")
    # eval per system: a grouped table plus a bar chart of the head's task accuracy
    rows = []
    for name, key in SYSTEMS:
        b = metric(base, "eval.json", f"task.{key}.task_accuracy")
        h = metric(head, "eval.json", f"task.{key}.task_accuracy")
        bf = metric(base, "eval.json", f"task.{key}.format_compliance")
        hf = metric(head, "eval.json", f"task.{key}.format_compliance")
        if any(v is not None for v in (b, h, bf, hf)):
            rows.append((name, b, h, bf, hf))
    if rows:
        out += [f"| system | task accuracy {_cell(base.label)} | task accuracy {_cell(head.label)} | "
                f"format compliance {_cell(base.label)} | format compliance {_cell(head.label)} |",
                "|---|---|---|---|---|"]
        out += [f"| {n} | {fmt(b, '.3f')} | {fmt(h, '.3f')} | {fmt(bf, '.3f')} | {fmt(hf, '.3f')} |"
                for n, b, h, bf, hf in rows]
        names = [n for n, *_ in rows]
        out += ["", "```mermaid", "xychart-beta", f'    title "task accuracy per system ({head.label})"',
                f"    x-axis [{', '.join(json.dumps(n) for n in names)}]", '    y-axis "task accuracy" 0 --> 1',
                f"    bar [{', '.join(str(round(h or 0.0, 4)) for _, _, h, _, _ in rows)}]", "```"]
    return out or ["No loss curves or eval results at either revision."]


def details(base: Snapshot, head: Snapshot) -> list[str]:
    rows = []
    for file in sorted(set(base.metrics) | set(head.metrics)):
        fb, fh = flatten(base.metrics.get(file)), flatten(head.metrics.get(file))
        for k in sorted(set(fb) | set(fh)):
            b, h = fb.get(k), fh.get(k)
            if b != h:
                rows.append(f"| {file} | `{k}` | {_cell(fmt(b))} | {_cell(fmt(h))} | {change(b, h)} |")
    if not rows:
        return ["No metric changed."]
    cut = len(rows) - MAX_DETAIL_ROWS
    lines = [f"| file | key | {_cell(base.label)} | {_cell(head.label)} | change |", "|---|---|---|---|---|"]
    lines += rows[:MAX_DETAIL_ROWS]
    if cut > 0:
        lines.append(f"\n{cut} more changed keys not shown (`dvc metrics diff --all` lists them).")
    return lines


def render(base: Snapshot, head: Snapshot, *, title: str = "llmpipe report", links: list[str] | None = None) -> str:
    """The PR comment (Markdown)."""
    out = [f"## {title}: `{head.label}` vs `{base.label}`", "",
           f"**Gate: {_verdict(head)}** (was {_verdict(base)} at `{base.label}`)", "",
           "### Metrics", "", *headline_table(base, head), "",
           "### Params changed", "", *params_table(base, head), "",
           "### Gate", "", *gate_table(base, head), "",
           "### Plots", "", *plots(base, head), ""]
    if links:
        out += [*links, ""]
    tail = ["<details><summary>Every changed metric</summary>", "", *details(base, head), "", "</details>"]
    text = "\n".join(out)
    rest = "\n".join(tail)
    if len(text) + len(rest) > MAX_CHARS:
        rest = "<details><summary>Every changed metric</summary>\n\nToo long for one comment: run " \
               "`dvc metrics diff --all`.\n\n</details>"
    return text + "\n" + rest + "\n"


def build_report(repo: str | Path, base: str, head: str | None = None, **kwargs: Any) -> str:
    """Report comparing git revision ``base`` with ``head`` (None: the workspace)."""
    return render(load_snapshot(repo, base), load_snapshot(repo, head), **kwargs)
