"""PERSON evidence for pii-scrub: a first-name lexicon, technical deny words, public figures.

spaCy's small English model tags many capitalised technical words as PERSON ("Java", "Lo"
from "Lo and behold", "Mage, Warrior, Bowman", product and company names) and misses names
after a sentence-initial verb ("Call Aisha Petrova at ..."). Both are fixed with evidence
that a name is a name:

- ``first_names()``: ~48,000 given names of 55 countries from gender-guesser's nam_dict
  (Jörg Michael's name dictionary; PyPI gender-guesser, pinned). It is a different source
  from the Faker name lists that benchmarks/pii_quality.py plants, so the benchmark measures
  recall on names the lexicon was not built from.
- ``DENY_WORDS``: technical and chat vocabulary that is also a given name in some country
  (Ruby, Julia, Max, Chase, Lo, ...) or that NER takes for a name; a detection made only of
  such words is not a person.
- ``PUBLIC_FIGURES``: well-known people (computing, science, business, politics) whose names
  in technical chat are not personal data of the writer; they are kept. A full name cited as
  the author or speaker of a public work ("a talk by ...", "the book by ...") or as the source
  of a quote ("As ... put it") is kept the same way, whether or not it is on the list.
- A lexicon name that is also a common English verb, adjective or adverb ("Run", "Chase",
  "Grace") is evidence only as the first word of a span: "Cloud Run" is not a person, "Grace
  Baker" is.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

TITLES = ("Mr", "Mrs", "Ms", "Miss", "Mx", "Dr", "Prof", "Sir", "Madam", "Mme", "Herr", "Frau")
NAME_PARTICLES = ("van", "von", "de", "der", "den", "da", "das", "do", "dos", "di", "del", "della",
                  "la", "le", "du", "bin", "binti", "al", "el", "ter", "ten", "y", "e")

# Technical and chat words that are given names somewhere, or that NER mistakes for names.
DENY_WORDS = frozenset("""
ada alpine android angular ansible apache apex arch arduino aria atom azure babel bash bazel
blazer bolt boost bower buck camel carbon cassandra celery chef chrome cobalt cocoa cypress
dart dash deno delta django docker eclipse elixir ember envoy erlang excel fabric falcon
fedora file flask flint flow flutter forge gatsby gem gemini git glacier gnome go gradle
grunt guava gulp harbor hat haskell helm hermes heroku hugo jasmine java jenkins jest jetty
jinja julia juno jupyter kafka karma keras kibana kotlin lambda laravel linux lo lua maven
mercury meteor mint mocha mongo neo nest nginx numpy oak oasis opal oracle orion pandas
pascal perl phoenix pip pixel prism puppet python quarkus rails react red redis remix
rocket ruby rust salt scala sentry sinatra slack solar spark sphinx spring swift tango
tensor terra thor titan tomcat torch ubuntu unity vagrant vega vim vue webpack yarn zeus zoom
hello hi hey dear thanks thank cheers regards best kind warm world foo bar baz lorem ipsum
mage warrior bowman paladin rogue archer knight wizard sorcerer necromancer druid cleric
dragonborn lich king queen prince princess lord lady god goddess
monday tuesday wednesday thursday friday saturday sunday
visa mastercard amex maestro paypal venmo iban swift bic boot tel fax mob ph attn fwd cc ps re
""".split())

PUBLIC_FIGURES = frozenset(n.lower() for n in """
Linus Torvalds|Guido van Rossum|Ada Lovelace|Alan Turing|Grace Hopper|Dennis Ritchie|
Bjarne Stroustrup|James Gosling|Brendan Eich|Tim Berners-Lee|Donald Knuth|Edsger Dijkstra|
Elon Musk|Bill Gates|Steve Jobs|Steve Wozniak|Satya Nadella|Sundar Pichai|Jeff Bezos|
Mark Zuckerberg|Tim Cook|Larry Page|Sergey Brin|Larry Ellison|Jack Dorsey|Sam Altman|
Barack Obama|Donald Trump|Joe Biden|Angela Merkel|Emmanuel Macron|Narendra Modi|Xi Jinping|
Vladimir Putin|Albert Einstein|Isaac Newton|Marie Curie|Charles Darwin|Nikola Tesla|
Stephen Hawking|Richard Feynman|Yann LeCun|Geoffrey Hinton|Yoshua Bengio|Andrew Ng|
Andrej Karpathy|Fei-Fei Li|Demis Hassabis|Ilya Sutskever|Martin Fowler|John Carmack|
Ken Thompson|Brian Kernighan|John McCarthy|Claude Shannon|John von Neumann|Niklaus Wirth|
Anders Hejlsberg|Rasmus Lerdorf|Yukihiro Matsumoto|Larry Wall|Rich Hickey|Jeff Dean|
Eric Schmidt|Paul Graham|Peter Thiel|Reid Hoffman|Marc Andreessen|Jensen Huang|Lisa Su|
William Shakespeare|Leonardo da Vinci|Napoleon Bonaparte|Abraham Lincoln|George Washington|
Winston Churchill|Mahatma Gandhi|Nelson Mandela|Martin Luther King|Taylor Swift|Beyonce|
Lionel Messi|Cristiano Ronaldo|Michael Jordan|Roger Federer|Serena Williams|Oprah Winfrey
""".replace("\n", "").split("|"))

_NAME_DICT = "data/nam_dict.txt"


@lru_cache(maxsize=1)
def _lexicon() -> frozenset[str]:
    """Lowercased given names from gender-guesser's nam_dict ('+' joins: every spelling)."""
    import gender_guesser

    path = os.path.join(os.path.dirname(gender_guesser.__file__), _NAME_DICT)
    names: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line[:1] in "#=" or len(line) < 4:
                continue
            name = line.split()[1].lower()
            if "+" in name:
                names.update(name.replace("+", sep) for sep in ("", " ", "-"))
            else:
                names.add(name)
    return frozenset(names)


@lru_cache(maxsize=1)
def first_names() -> frozenset[str]:
    """Given names that count as evidence: the lexicon less English stop words ('the', 'so',
    'can' are given names somewhere) and deny words."""
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(_lexicon() - STOP_WORDS - DENY_WORDS)


@lru_cache(maxsize=1)
def _denied_names() -> frozenset[str]:
    """Deny words that are given names (Julia, Ruby, Ada): evidence only next to a surname."""
    return frozenset(_lexicon() & DENY_WORDS)


_WORD = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")


def words(text: str) -> list[str]:
    """Alphabetic words of a span, possessive 's dropped."""
    return [re.sub(r"['\u2019]s$", "", w) for w in _WORD.findall(text)]


def is_public_figure(text: str) -> bool:
    return " ".join(words(text)).lower() in PUBLIC_FIGURES


# A full name cited as the author/speaker of a public work or as the source of a quote: "a talk
# by ...", "the book written by ...", "As ... put it". Published authors and quoted speakers
# are public in that role; a personal cue ("my colleague ...") never matches (anchored at the
# name).
_WORKS = (r"talks?|keynotes?|lectures?|speech(?:es)?|presentations?|books?|papers?|articles?|essays?|"
          r"(?:blog )?posts?|blogs?|videos?|podcasts?|courses?|tutorials?|interviews?|quotes?|tweets?|"
          r"novels?|albums?|songs?|films?|movies?|documentar(?:y|ies)|paintings?|theorems?|proofs?")
_CITED_BEFORE = re.compile(
    rf"(?i)(?:\b(?:{_WORKS})[ \t]+by|\b(?:written|authored|coined|invented|created|designed|"
    rf"popularized|popularised|founded|directed|composed|painted|proposed|proved|formulated)[ \t]+by|"
    rf"\bin the words of|\bquot(?:e|ing) from)[ \t]+$")
_AS_BEFORE = re.compile(r"(?:^|[.!?]\s+|\n|,[ \t]+)[Aa]s[ \t]+$")
_QUOTE_AFTER = re.compile(r"^[ \t]+(?:once[ \t]+|famously[ \t]+)?(?:put it|said|says|wrote|writes|noted|"
                          r"observed|remarked|quipped)\b")


def is_cited(text: str, before: str, after: str) -> bool:
    """A full name (two or more capitalised words) cited as the author or speaker of a public
    work, or as the source of a quote ("As Rob Pike put it")."""
    ws = [w for w in words(text) if w.lower() not in NAME_PARTICLES]
    if len(ws) < 2 or not all(w[:1].isupper() for w in ws):
        return False
    return bool(_CITED_BEFORE.search(before) or (_AS_BEFORE.search(before) and _QUOTE_AFTER.match(after)))


def has_given_name(lowered: list[str]) -> bool:
    """Lowercased words of a span hold a given name of the lexicon: the first word, or a later
    word that is not also a common English verb/adjective/adverb ("Cloud Run" holds none,
    "Email Adrian Andersson" and "Aisha Petrova" do)."""
    names = first_names()
    return any(w in names and (i == 0 or w not in _COMMON) for i, w in enumerate(lowered))


_ENGLISH: set[str] = set()  # English words (WordNet lemma index)
_COMMON: set[str] = set()  # of those, the verbs/adjectives/adverbs
# Words right before/after a span that say it names a person ("Mr.", "my name is", "Dear",
# "Call", "spoke with", "my colleague", "... said").
_CUE_BEFORE = re.compile(
    r"(?i)(?:\b(?:mr|mrs|ms|miss|mx|dr|prof|sir|madam)\.?|\bname is|\bname's|\bthis is|\bi am|\bi'm|\bdear|"
    r"\bhi|\bhello|\bhey|\bthanks|\bregards|\bcheers|\bcall|\bask|\btell|\bemail|\binvite|\bremind|"
    r"\bforward (?:this |it )?to|\bmet|\bspoke (?:with|to)|\btalked to|\bcolleague|\bmother|\bfather|\bwife|"
    r"\bhusband|\bsister|\bbrother|\bdaughter|\bson|\bfriend|\bmanager|\bboss|\bcontact(?: person)?|"
    r"\bregistered to|\bbehalf of(?: my \w+)?|\battn|\bc/o|\bsigned,?)"
    r"[ \t]*[,:]?[ \t\n]*$")
# A preposition or determiner right before the span: a place, product or company, not a person.
_PLACE_BEFORE = re.compile(r"(?i)\b(?:in|on|at|to|from|near|across|via|into|the|a|an|our|my|your|their|its)[ \t]+$")
# A capitalised word mid-sentence (after a lowercase word) right before the span.
_PROPER_BEFORE = re.compile(r"\b[a-z]+[ \t]+([A-Z][\w-]*)[ \t]+$")
_CUE_AFTER = re.compile(r"^(?:['\u2019]s\b|[ \t]+(?:here|said|says|reported|wrote|called|asked|needs|and I|will)\b|,? who\b)")


def _is_common(word: str) -> bool:
    """A common English verb/adjective/adverb, or one with -s/-ed/-ing ("acknowledged")."""
    forms = [word]
    if word.endswith("s"):
        forms += [word[:-1], word[:-2]]
    if word.endswith("ed"):
        forms += [word[:-1], word[:-2]]
    if word.endswith("ing"):
        forms += [word[:-3], word[:-3] + "e"]
    return any(w in _COMMON for w in forms) and word not in _lexicon()


def is_common_phrase(text: str) -> bool:
    """Only common English verbs/adjectives/adverbs and no given name: a whole message
    "Continue" or "Acknowledged." is a reply, not a signed name."""
    lowered = [w.lower() for w in words(text)]
    return bool(lowered) and all(_is_common(w) for w in lowered) and not has_given_name(lowered)


def set_english_words(english: set[str], common: set[str] = frozenset()) -> None:
    """English words (the spaCy model's WordNet lemma index), for ``name_evidence``; ``common``:
    those that are also verbs, adjectives or adverbs (WordNet's proper names are nouns only)."""
    _ENGLISH.clear()
    _ENGLISH.update(english)
    _COMMON.clear()
    _COMMON.update(common)


def name_evidence(text: str, before: str = "", after: str = "") -> str | None:
    """Why a PERSON span is not a person (a discard reason), or None if it may be one.

    A span made only of deny words, or naming a public figure, is never a person. Otherwise it
    needs evidence: a given name of the lexicon among its words, a person cue next to it
    (``before``/``after``: "Mr.", "my name is", "Dear", "spoke with", "... said"), or two or
    more capitalised words none of which is an English word ("Olasunmbo Oyinlola", not
    "Cloud Run" or "Bay Area").
    """
    ws = words(text)
    if not ws:
        return "not_a_name"
    if is_public_figure(text) or is_cited(text, before, after):
        return "public_figure"
    if not _CUE_BEFORE.search(before):
        if _PLACE_BEFORE.search(before):
            return "place_context"  # "deploy to São Paulo", "on Austin servers", "the Meta docs"
        m = _PROPER_BEFORE.search(before)
        if m and m.group(1).lower() not in first_names():
            return "place_context"  # "works with Google Cloud Run": the tail of a longer proper noun
    lowered = [w.lower() for w in ws if w.lower() not in NAME_PARTICLES] or [ws[0].lower()]
    if all(w in DENY_WORDS for w in lowered):
        return "deny_list"
    if has_given_name(lowered):
        return None
    if len(lowered) > 1 and any(w in _denied_names() for w in lowered):
        return None  # "Julia Roberts": a given name that is also a deny word, with a surname
    if _CUE_BEFORE.search(before) or _CUE_AFTER.match(after):
        return None
    if not after.strip(" \t.!:)") and (not before.strip() or before.rstrip(" \t")[-1:] in ".!?,\n-") \
            and not is_common_phrase(text):
        return None  # a sign-off: the last words of the message, after a sentence end (not a
        # message that is just "Continue" or "Acknowledged")
    if len(lowered) > 1 and all(w[:1].isupper() for w in ws if w.lower() not in NAME_PARTICLES) \
            and not any(w in _ENGLISH for w in lowered):
        return None
    return "not_in_lexicon"

