"""Optional LLM-as-judge against any OpenAI-compatible chat endpoint (off by default).

The judge gets a 1-5 rubric, the user message, the reference reply and the model's reply, and
must answer with a JSON verdict ``{"score": 1..5, "reason": "..."}``. Malformed verdicts (no JSON
object, score missing / not an integer in 1..5) are retried up to ``max_retries`` times, each
retry telling the judge what was wrong and sampling with ``retry_temperature`` so a greedy judge
does not repeat itself. A verdict that is still malformed after the retries is recorded as
unjudged (score None) with every raw answer, never guessed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import httpx

from llmpipe.config.evaluate import JudgeSection

RUBRIC = """You are grading a support triage assistant. It must answer with ONLY a JSON object
with the keys "intent", "product", "urgency" and "order_id".
Score the assistant's reply from 1 to 5:
5 = every field correct and the reply is only the JSON object;
4 = one minor field wrong (e.g. urgency) or harmless extra text;
3 = the intent is right but several other fields are wrong or missing;
2 = the intent is wrong, or the reply is hard to parse;
1 = no usable answer.
Answer with ONLY a JSON object: {"score": <integer 1-5>, "reason": "<one sentence>"}"""


class JudgeError(RuntimeError):
    """The judge endpoint cannot be reached or answers with an HTTP error."""


@dataclass
class Verdict:
    score: int | None
    reason: str | None
    attempts: int
    raw: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.score is not None


def parse_verdict(text: str) -> tuple[int, str]:
    """Parse a judge answer; raises ValueError saying what is malformed."""
    from llmpipe.evaluate.scorers import extract_json_object

    obj = extract_json_object(text or "")
    if obj is None:
        raise ValueError("no JSON object in the verdict")
    if "score" not in obj:
        raise ValueError("verdict has no 'score' key")
    score = obj["score"]
    if isinstance(score, str) and score.strip().isdigit():
        score = int(score.strip())
    if isinstance(score, bool) or not isinstance(score, int):
        raise ValueError(f"'score' must be an integer, got {score!r}")
    if not 1 <= score <= 5:
        raise ValueError(f"'score' must be between 1 and 5, got {score}")
    reason = obj.get("reason")
    return score, reason if isinstance(reason, str) else ""


class Judge:
    """A client for one OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None,
        max_retries: int,
        timeout_s: float,
        max_tokens: int,
        retry_temperature: float,
        seed: int,
        client: httpx.Client | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("judge max_retries must be >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_retries = max_retries
        self.max_tokens = max_tokens
        self.retry_temperature = retry_temperature
        self.seed = seed
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(timeout=timeout_s, headers=headers)

    def close(self) -> None:
        self._client.close()

    def _complete(self, messages: list[dict[str, str]], temperature: float, seed: int) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": self.max_tokens,
            "seed": seed,
        }
        try:
            resp = self._client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise JudgeError(f"judge endpoint {self.url}: {exc}") from exc
        if resp.status_code != 200:
            raise JudgeError(f"judge endpoint {self.url}: HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            return resp.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise JudgeError(f"judge endpoint {self.url}: unexpected response shape: {resp.text[:200]}") from exc

    def judge(self, user_message: str, reference: str, reply: str) -> Verdict:
        messages = [
            {"role": "system", "content": RUBRIC},
            {
                "role": "user",
                "content": f"Customer message:\n{user_message}\n\nReference answer:\n{reference}\n\n"
                f"Assistant reply to grade:\n{reply}\n\nYour verdict as JSON:",
            },
        ]
        raw: list[str] = []
        errors: list[str] = []
        for attempt in range(self.max_retries + 1):
            temperature = 0.0 if attempt == 0 else self.retry_temperature
            text = self._complete(messages, temperature, self.seed + attempt)
            raw.append(text)
            try:
                score, reason = parse_verdict(text)
            except ValueError as exc:
                errors.append(str(exc))
                messages = messages[:2] + [
                    {"role": "assistant", "content": text},
                    {
                        "role": "user",
                        "content": f"That verdict was malformed ({exc}). Answer again with ONLY "
                        '{"score": <integer 1-5>, "reason": "<one sentence>"}.',
                    },
                ]
                continue
            return Verdict(score, reason, attempt + 1, raw, errors)
        return Verdict(None, None, self.max_retries + 1, raw, errors)


def judge_outputs(judge: Judge, rows: Sequence[dict[str, Any]], limit: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Judge per-example output rows (keys ``user``, ``reference``, ``output``).

    Returns (metrics, verdict rows). Metrics: mean score over judged examples, how many were
    judged/unjudged and how many retries malformed verdicts cost.
    """
    chosen = list(rows)[: limit if limit is not None else None]
    verdicts = []
    for i, row in enumerate(chosen, start=1):
        v = judge.judge(row["user"], row["reference"], row["output"])
        verdicts.append({"id": row.get("id"), **asdict(v)})
        print(f"[judge] {i}/{len(chosen)} score={v.score} attempts={v.attempts}", file=sys.stderr, flush=True)
    judged = [v["score"] for v in verdicts if v["score"] is not None]
    metrics = {
        "n": len(verdicts),
        "n_judged": len(judged),
        "n_unjudged": len(verdicts) - len(judged),
        "mean_score": sum(judged) / len(judged) if judged else None,
        "retries": sum(v["attempts"] - 1 for v in verdicts),
    }
    return metrics, verdicts


def from_config(cfg: JudgeSection, seed: int) -> Judge:
    """Build a Judge from the typed ``eval.judge`` params section."""
    return Judge(
        cfg.base_url,
        cfg.model,
        api_key=os.environ.get(cfg.api_key_env) if cfg.api_key_env else None,
        max_retries=cfg.max_retries,
        timeout_s=cfg.timeout_s,
        max_tokens=cfg.max_tokens,
        retry_temperature=cfg.retry_temperature,
        seed=seed,
    )
