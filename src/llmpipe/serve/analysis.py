"""Canary analysis: compare a window of canary samples with stable samples and decide.

Pure functions over numbers, so the decision rules are unit-testable without servers. The
thresholds are the typed ``deploy.thresholds`` section of params.yaml.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from llmpipe.config.serve import ThresholdsSection as Thresholds  # deploy.thresholds in params.yaml


@dataclass(frozen=True)
class Sample:
    """One request as the router saw it on one backend."""

    ok: bool                      # backend answered 2xx with a parseable body
    latency_s: float              # time spent on that backend
    compliant: bool | None = None  # reply format valid (None: not scored, e.g. streamed)
    reason: str = ""              # error or non-compliance reason


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class WindowStats:
    n: int
    errors: int
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    scored: int
    compliant: int
    compliance: float | None
    top_reasons: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, samples: Iterable[Sample]) -> "WindowStats":
        samples = list(samples)
        n = len(samples)
        errors = sum(1 for s in samples if not s.ok)
        lat = [s.latency_s * 1000.0 for s in samples if s.ok]
        scored = [s for s in samples if s.ok and s.compliant is not None]
        good = sum(1 for s in scored if s.compliant)
        reasons: dict[str, int] = {}
        for s in samples:
            if s.reason:
                key = s.reason.split(":")[0][:60]
                reasons[key] = reasons.get(key, 0) + 1
        return cls(
            n=n,
            errors=errors,
            error_rate=errors / n if n else 0.0,
            p50_ms=percentile(lat, 50),
            p95_ms=percentile(lat, 95),
            scored=len(scored),
            compliant=good,
            compliance=good / len(scored) if scored else None,
            top_reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5]),
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("error_rate", "p50_ms", "p95_ms", "compliance"):
            if d[k] is not None:
                d[k] = round(d[k], 4)
        return d


@dataclass(frozen=True)
class Verdict:
    action: str            # "wait" | "pass" | "fail"
    reasons: list[str]
    canary: dict[str, Any]
    stable: dict[str, Any]


def analyze(canary: WindowStats, stable: WindowStats, thr: Thresholds) -> Verdict:
    """Decide on one analysis window.

    ``fail`` as soon as the canary's errors alone already exceed what ``min_requests`` allows
    (early rollback); otherwise ``wait`` until the window holds ``min_requests`` canary samples
    and enough stable samples, then ``pass`` only if every check holds.
    """
    c, s = canary.as_dict(), stable.as_dict()
    allowed_errors = math.floor(thr.max_error_rate * max(thr.min_requests, canary.n) + 1e-9)
    if canary.errors > allowed_errors:
        return Verdict("fail", [
            f"errors: {canary.errors} canary errors > {allowed_errors} allowed "
            f"(max_error_rate {thr.max_error_rate} of {max(thr.min_requests, canary.n)} requests)"
            + (f"; reasons {canary.top_reasons}" if canary.top_reasons else "")
        ], c, s)
    if canary.n < thr.min_requests or stable.n < thr.min_stable_requests:
        return Verdict("wait", [
            f"window: {canary.n}/{thr.min_requests} canary, {stable.n}/{thr.min_stable_requests} stable requests"
        ], c, s)

    failures: list[str] = []
    passes: list[str] = []

    def check(ok: bool, text: str) -> None:
        (passes if ok else failures).append(("ok " if ok else "FAIL ") + text)

    inc = canary.error_rate - stable.error_rate
    check(inc <= thr.max_error_rate_increase + 1e-12,
          f"error rate {canary.error_rate:.3f} vs stable {stable.error_rate:.3f} "
          f"(increase {inc:+.3f}, max {thr.max_error_rate_increase})")
    for name, cv, sv, ratio in (("p50", canary.p50_ms, stable.p50_ms, thr.max_p50_ratio),
                                ("p95", canary.p95_ms, stable.p95_ms, thr.max_p95_ratio)):
        if cv is None or sv is None:
            check(cv is not None or sv is None, f"latency {name}: canary {cv} ms, stable {sv} ms")
            continue
        limit = sv * ratio + thr.latency_slack_ms
        check(cv <= limit, f"latency {name} {cv:.1f} ms vs stable {sv:.1f} ms (limit {limit:.1f} ms)")
    if canary.compliance is None:
        check(stable.compliance is None, "format compliance: canary replies were not scored")
    else:
        base = stable.compliance if stable.compliance is not None else 0.0
        floor = max(base - thr.max_compliance_drop, thr.min_compliance)
        check(canary.compliance + 1e-12 >= floor,
              f"format compliance {canary.compliance:.3f} vs stable {base:.3f} (floor {floor:.3f})"
              + ("" if canary.compliance >= floor or not canary.top_reasons else f"; reasons {canary.top_reasons}"))
    if failures:
        return Verdict("fail", failures + passes, c, s)
    return Verdict("pass", passes, c, s)
