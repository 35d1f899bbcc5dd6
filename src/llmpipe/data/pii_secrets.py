"""SECRET detection for pii-scrub: API keys, tokens, private keys, passwords in URLs/configs.

The detectors are detect-secrets' (Yelp; what BigCode's PII pipeline used), run line by line
with its own false-positive filters (UUIDs, sequential strings, templated values, ${VAR}
references, ...). Chosen by measurement on benchmarks/pii_quality.py:

- the provider plugins (AWS, GitHub, GitLab, Slack, Stripe, Twilio, JWT, npm, PyPI, ...),
  BasicAuth (``scheme://user:PASSWORD@host``), Keyword (``password = "..."``) and PrivateKey;
- not the Hex/Base64 *entropy* plugins: on technical chat they flag git SHAs, checksums and
  base64 test data far more often than secrets.

detect-secrets reports some secrets by their prefix only (GitHub's ``ghp``) and a private
key by its BEGIN line, so each hit is widened to the whole token, or to the whole PEM block.
Three small patterns cover what its plugins leave out in chat text: unquoted ``KEY=value``
assignments whose name says secret (``DB_PASSWORD=...``, ``aws_secret_access_key = ...``),
``Password=...;`` in connection strings, and Google (``AIza``) / OpenAI (``sk-``) keys.
"""

from __future__ import annotations

import re
from functools import lru_cache

from llmpipe.data.pii_code import merge_spans

PLUGINS = (
    "AWSKeyDetector", "ArtifactoryDetector", "AzureStorageKeyDetector", "BasicAuthDetector",
    "CloudantDetector", "DiscordBotTokenDetector", "GitHubTokenDetector", "GitLabTokenDetector",
    "IbmCloudIamDetector", "IbmCosHmacDetector", "JwtTokenDetector", "KeywordDetector",
    "MailchimpDetector", "NpmDetector", "OpenAIDetector", "PrivateKeyDetector",
    "PypiTokenDetector", "SendGridDetector", "SlackDetector", "SoftlayerDetector",
    "SquareOAuthDetector", "StripeDetector", "TelegramBotTokenDetector", "TwilioKeyDetector",
)

# A line can only hold a secret if it has a long token, credentials in a URL, a key block or
# a secret-ish word: every other line skips detect-secrets (most chat lines).
_CANDIDATE_LINE = re.compile(
    r"[A-Za-z0-9+/_\-]{16,}|://[^\s/@]*:[^\s/@]+@|PRIVATE KEY|(?i:pass|pwd|secret|token|key|auth|credential)"
)
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-+/=.~]*")
_URL_PASSWORD = re.compile(r"://[^\s:/@]+:(?P<v>[^\s/@]+)@")
_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
                        re.DOTALL)
_EXTRA = [
    # KEY=value / key: value where the name says it is a secret (unquoted; .env, YAML, shell)
    re.compile(r"(?i)\b[\w.-]*(?:passw(?:or)?d|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|auth[_-]?key)"
               r"[\w.-]*[\"']?[ \t]*[:=][ \t]*[\"']?(?P<v>[^\s\"',;]{8,})"),
    # Password=...; in ADO/JDBC connection strings
    re.compile(r"(?i)\b(?:password|pwd)=(?P<v>[^;\s\"']{4,})"),
    # user:password@ in any URL (detect-secrets' BasicAuth stops at some special characters)
    _URL_PASSWORD,
    # JSON Web Tokens (header.payload.signature)
    re.compile(r"(?P<v>\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})"),
    # Google API keys; OpenAI keys (sk-..., sk-proj-...)
    re.compile(r"(?P<v>\bAIza[0-9A-Za-z_\-]{35})"),
    re.compile(r"(?P<v>\bsk-(?:proj-|ant-)?[A-Za-z0-9_\-]{32,})"),
]
# Values that are placeholders, not secrets.
_PLACEHOLDER = re.compile(r"(?i)^(?:\$\{?\w+\}?|<[^>]*>|\{\{.*\}\}|x{4,}|\*{4,}|\.{3,}|your[_-].*|changeme|"
                          r"none|null|true|false|password|secret|token|example|os\.environ.*|process\.env.*|"
                          r"getenv.*|env\(.*)$")


def _looks_random(value: str) -> bool:
    """A credential value, not a placeholder or code: letters and digits, no call/index syntax."""
    return (not _PLACEHOLDER.match(value) and any(c.isdigit() for c in value)
            and any(c.isalpha() for c in value) and not any(c in value for c in "()[]{}<>"))


@lru_cache(maxsize=1)
def _configure() -> None:
    from detect_secrets.settings import get_settings

    get_settings().configure_plugins([{"name": name} for name in PLUGINS])


def _widen(text: str, start: int) -> int:
    """End of the token that starts at ``start``."""
    return start + _TOKEN_CHARS.match(text, start).end() - start


def find_secrets(text: str) -> list[tuple[int, int]]:
    """(start, end) of every secret in ``text``, overlapping hits merged."""
    from detect_secrets.core.scan import _process_line_based_plugins

    _configure()
    spans: list[tuple[int, int]] = []
    offsets, lines = [], []
    pos = 0
    for line in text.split("\n"):
        if _CANDIDATE_LINE.search(line):
            offsets.append(pos)
            lines.append(line)
        pos += len(line) + 1
    if not lines:
        return []
    numbered = list(enumerate(lines, start=1))
    for secret in _process_line_based_plugins(numbered, filename="message"):
        if not secret.secret_value:
            continue
        line = lines[secret.line_number - 1]
        base = offsets[secret.line_number - 1]
        at = line.find(secret.secret_value)
        if at < 0:
            continue
        if secret.type == "Private Key":
            m = _PEM_BLOCK.search(text, max(0, base + at - 11))
            spans.append((m.start(), m.end()) if m else (base + at, base + len(line)))
        else:
            spans.append((base + at, base + _widen(line, at)))
    for line, base in zip(lines, offsets):
        for rx in _EXTRA:
            for m in rx.finditer(line):
                value = m.group("v")
                if _looks_random(value) if rx is _EXTRA[0] else not _PLACEHOLDER.match(value):
                    spans.append((base + m.start("v"), base + m.end("v")))
    return merge_spans(spans)
