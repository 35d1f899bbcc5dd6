"""Presidio recognizers of our own: lenient phone numbers, secrets, lexicon-backed names.

Each is a presidio ``EntityRecognizer``, so the AnalyzerEngine scores, context-boosts and
thresholds its results like those of the built-in recognizers.
"""

from __future__ import annotations

import re

from spacy.lang.en.stop_words import STOP_WORDS
from presidio_analyzer import AnalysisExplanation, EntityRecognizer, RecognizerResult

from llmpipe.data.pii_names import _ENGLISH, DENY_WORDS, NAME_PARTICLES, TITLES, first_names, has_given_name
from llmpipe.data.pii_secrets import find_secrets

# --------------------------------------------------------------------------------------------
# Phone numbers

# A run of digit groups with phone separators: optional +CC/00 prefix, (area) groups,
# space/dot/dash separators. Not inside a word, a path, a version string or a longer number.
_PHONE = re.compile(
    r"(?<![\w+/.:@#=-])(?:\+|00)?(?:\(\d{1,5}\)|\d{1,6})"
    r"(?:(?:[ .\-]|[ ]?-[ ]?)?(?:\(\d{1,5}\)|\d{1,8})){0,6}"
    r"(?![\w/@]|[.:\-]\d|,\d)"
)
_PHONE_CONTEXT = re.compile(
    r"(?i)(?:phone|tel\b|tel\.|telephone|call|mobile|cell|fax|whats ?app|number|reach|ring|text|"
    r"contact|sms|landline|hotline|\bph\b|\bmob\b|telefon|tél|numero|número)[^\n]{0,40}$"
)
_PHONE_CONTEXT_AFTER = re.compile(r"(?i)[^\n]{0,15}\b(?:phone|cell|mobile|number|landline|whats ?app|fax)\b")
_DATE = re.compile(r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})$")
_IPV4ISH = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_SSN_SHAPE = re.compile(r"^\d{3}[- ]\d{2}[- ]\d{4}$")
_THOUSANDS = re.compile(r"^\d{1,2}(?: \d{3})+$")


def phone_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of phone numbers in any common national or international format,
    whether or not the number is valid in its numbering plan."""
    out = []
    for m in _PHONE.finditer(text):
        value = m.group()
        digits = sum(c.isdigit() for c in value)
        groups = re.findall(r"\d+", value)
        international = value.startswith(("+", "00"))
        if not 7 <= digits <= 15 or (international and digits < 8):
            continue
        if _DATE.match(value) or _IPV4ISH.match(value) or _SSN_SHAPE.match(value):
            continue
        context = (_PHONE_CONTEXT.search(text, max(0, m.start() - 60), m.start())
                   or _PHONE_CONTEXT_AFTER.match(text, m.end(), m.end() + 30))
        if len(groups) == 1 and not international and not context:
            continue  # a bare digit run is an id or an amount unless the text says phone
        if len(groups) == 2 and "." in value and "(" not in value and not context:
            continue  # a decimal number
        if _THOUSANDS.match(value) and not context:
            continue  # "1 000 000"
        if len(groups[-1]) < 2:
            continue
        out.append(m.span())
    return out


class LenientPhoneRecognizer(EntityRecognizer):
    """PHONE_NUMBER by shape (see ``phone_spans``), not by numbering-plan validity: Presidio's
    PhoneRecognizer keeps only numbers python-phonenumbers validates, so "(255) 821-9655"
    or "+1 433 846 6935" stayed in the text."""

    SCORE = 0.6

    def __init__(self, supported_language: str = "en"):
        super().__init__(supported_entities=["PHONE_NUMBER"], name="LenientPhoneRecognizer",
                         supported_language=supported_language,
                         context=["phone", "call", "mobile", "cell", "tel", "number", "fax"])

    def load(self) -> None:
        pass

    def analyze(self, text, entities, nlp_artifacts=None):
        return [self._result("PHONE_NUMBER", s, e, self.SCORE) for s, e in phone_spans(text)]

    def _result(self, entity: str, start: int, end: int, score: float) -> RecognizerResult:
        return RecognizerResult(entity_type=entity, start=start, end=end, score=score,
                                analysis_explanation=AnalysisExplanation(recognizer=self.name,
                                                                         original_score=score),
                                recognition_metadata={RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                                                      RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id})


class SecretRecognizer(LenientPhoneRecognizer):
    """SECRET: API keys, tokens, private keys, passwords (llmpipe.data.pii_secrets)."""

    def __init__(self, supported_language: str = "en"):
        EntityRecognizer.__init__(self, supported_entities=["SECRET"], name="SecretRecognizer",
                                  supported_language=supported_language)

    def analyze(self, text, entities, nlp_artifacts=None):
        return [self._result("SECRET", s, e, 1.0) for s, e in find_secrets(text)]


# --------------------------------------------------------------------------------------------
# Names with lexicon evidence

_UP = "A-Z\u00c0-\u00d6\u00d8-\u00de\u0100-\u017f\u0218-\u021b"
_LO = "a-z\u00df-\u00f6\u00f8-\u00ff\u0100-\u017f\u0219\u021b"
_CAP = rf"[{_UP}][{_LO}]+(?:['\u2019-][{_UP}{_LO}][{_LO}]+)*"
_PARTICLE = "|".join(NAME_PARTICLES)
# A capitalised word, then one or two more (particles allowed in between): "Aisha Petrova",
# "Amir van Hagen". The first word must be a given name of the lexicon.
_FULL_NAME = re.compile(rf"\b(?P<first>{_CAP})(?:[ \t]+(?:(?:{_PARTICLE})[ \t]+)?{_CAP}){{1,2}}\b")
_CAPWORD = re.compile(rf"\b{_CAP}\b")
_CAP_RUN = re.compile(rf"\b{_CAP}(?:[ \t]+(?:(?:{_PARTICLE})[ \t]+)?{_CAP}){{1,3}}\b")
# A title and a surname: "Mr. Okafor", "Dr Petrova", "Ms. Anne Lee".
_TITLED = re.compile(rf"\b(?:{'|'.join(TITLES)})\.?[ \t]+(?P<name>{_CAP}(?:[ \t]+{_CAP})?)\b")
# A greeting or a sign-off with a single given name: "Hi Jonas,", "Dear Maria", "Thanks, Noah".
_GREETING = re.compile(rf"\b(?:Hi|Hello|Hey|Dear|Thanks|Thank you|Cheers|Regards|Best)[ \t]*,?[ \t]+"
                       rf"(?P<name>{_CAP})(?=[ \t]*[,!.\n]|[ \t]*$)", re.MULTILINE)


_BEFORE_CUE = re.compile(rf"(?:^|(?<=[.!?] )|(?<=\n))(?P<name>{_CAP}(?:[ \t]+{_CAP})?)"
                         rf"(?=['\u2019]s\b|[ \t]+(?:and I|said|reported|here|wrote)\b)", re.MULTILINE)


def _plausible(name: str, names: frozenset[str]) -> bool:
    """A given name of the lexicon, or words that are neither English nor technical."""
    low = [w.lower() for w in name.split()]
    return any(w in names for w in low) or not any(w in _ENGLISH or w in DENY_WORDS or w in STOP_WORDS
                                                   for w in low)


class LexiconNameRecognizer(LenientPhoneRecognizer):
    """PERSON where spaCy's small model often misses one: a given name of the lexicon followed
    by capitalised words ("Call Aisha Petrova at ..."), a title and a surname, or a given name
    in a greeting or sign-off."""

    def __init__(self, supported_language: str = "en"):
        EntityRecognizer.__init__(self, supported_entities=["PERSON"], name="LexiconNameRecognizer",
                                  supported_language=supported_language)

    def analyze(self, text, entities, nlp_artifacts=None):
        names = first_names()
        out = []
        for m in _CAP_RUN.finditer(text):  # runs of 2+ capitalised words holding a given name
            ws = list(_CAPWORD.finditer(m.group()))
            while ws and (ws[0].group().lower() in _ENGLISH or ws[0].group().lower() in STOP_WORDS) \
                    and ws[0].group().lower() not in names:
                ws.pop(0)  # "Call Ngeni Naomi": the sentence-initial verb is no part of the name
            low = [w.group().lower() for w in ws]
            if len(ws) >= 2 and (has_given_name(low)
                                 or not any(w in _ENGLISH or w in DENY_WORDS for w in low)):
                out.append(self._result("PERSON", m.start() + ws[0].start(), m.start() + ws[-1].end(), 0.6))
        for m in _BEFORE_CUE.finditer(text):  # "Katalin and I", "Kiptoo Musili's laptop"
            if _plausible(m.group("name"), names):
                out.append(self._result("PERSON", m.start("name"), m.end("name"), 0.5))
        for m in _TITLED.finditer(text):
            out.append(self._result("PERSON", m.start("name"), m.end("name"), 0.6))
        for m in _GREETING.finditer(text):
            if _plausible(m.group("name"), names):
                out.append(self._result("PERSON", m.start("name"), m.end("name"), 0.5))
        return out
