"""Deterministic generator of the bundled "support triage" demo dataset (``data/raw``).

The user turn is a customer-support message; the assistant reply is ONLY a compact JSON object
``{"intent": ..., "product": ..., "urgency": ..., "order_id": ...}`` (keys in that order). Every
label is determinable from the message text alone:

- ``intent``: the body sentences are written per intent (no sentence is shared between intents);
- ``product``: one of :data:`PRODUCT_SYNONYMS` appears in the text, or none does (``unknown``);
- ``urgency``: a low cue (:data:`LOW_CUES`) means ``low``; otherwise a high cue
  (:data:`HIGH_CUES`: "urgent", "ASAP", deadlines, anger) means ``high``; otherwise ``medium``;
- ``order_id``: the only token matching ``[A-Z]{2}[0-9]{6}`` in the text, or ``null``.

:func:`derive_labels` implements those rules and the generator checks every message against
them, so a template edit that breaks the contract fails loudly instead of shipping wrong labels.

Besides the labelled examples the data set plants work for the later stages: realistic PII
(names, emails, phone numbers, street addresses, Luhn-valid card numbers, SSNs, IPs,
mod-97-valid IBANs) for pii-scrub, exact and near duplicates for minhash-dedup, and a few
invalid records for validate. Everything is derived from one ``random.Random(seed)``; no time,
uuid or hash randomisation is involved, so the output is byte-for-byte reproducible.

Run ``python -m llmpipe.demo --out data/raw`` (from the repository root, PYTHONPATH=src).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from llmpipe.demo import safety as safety_demo
from llmpipe.io import atomic_path

DEFAULT_SEED = 20240611

# --- label space (fixed; shared with data/task/support_triage.schema.json) ---------------------

INTENTS = (
    "order_status", "refund_request", "cancel_order", "shipping_address_change",
    "technical_issue", "billing_question", "account_access", "product_inquiry",
)
PRODUCTS = (
    "smart_thermostat", "wireless_earbuds", "robot_vacuum", "fitness_tracker", "coffee_maker",
    "e_reader", "security_camera", "electric_kettle", "unknown",
)
URGENCIES = ("low", "medium", "high")
REPLY_KEYS = ("intent", "product", "urgency", "order_id")
ORDER_ID_RE = re.compile(r"^[A-Z]{2}[0-9]{6}$")
ORDER_ID_IN_TEXT_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{6}(?![A-Za-z0-9])")

# Must equal params.yaml validate.default_system_prompt (tests/test_demo.py checks it).
SYSTEM_PROMPT = (
    'You are a support triage assistant. Read the customer\'s message and answer with only a '
    'JSON object with the keys "intent", "product", "urgency" and "order_id".'
)
ALPACA_INSTRUCTIONS = (
    "Triage this support message.",
    "Triage the following customer support message.",
    "Classify this support ticket.",
    "Read the customer message and return the triage JSON.",
    "Extract intent, product, urgency and order id from this message.",
)

# --- output files and sizes --------------------------------------------------------------------

MESSAGES_FILE = "support_chat.jsonl"
ALPACA_FILE = "support_alpaca.json"
SHAREGPT_FILE = "support_sharegpt.jsonl"
FILES = (MESSAGES_FILE, ALPACA_FILE, SHAREGPT_FILE)
# Everything written to data/raw: the triage files plus the safety mix (llmpipe.demo.safety).
ALL_FILES = FILES + (safety_demo.FILE,)

N_BASE = {"messages": 1500, "alpaca": 240, "sharegpt": 260}      # distinct examples: 2,000
# Planted exact duplicates: (format of the source, format of the copy) -> count.
N_EXACT = {("messages", "messages"): 40, ("messages", "sharegpt"): 8,
           ("sharegpt", "sharegpt"): 8, ("alpaca", "alpaca"): 9}
# Planted near duplicates (a few words / punctuation / casing / greeting changed).
N_NEAR = {("messages", "messages"): 55, ("messages", "sharegpt"): 10,
          ("sharegpt", "sharegpt"): 10, ("alpaca", "alpaca"): 12}
# Deliberately invalid records, all in the messages file (validate must reject them).
BAD_KINDS = ("empty_reply", "ends_with_user", "unknown_role", "short_reply", "malformed_json")
N_BAD_PER_KIND = 4
MAX_BASE_JACCARD = 0.7       # distinct examples with the same labels (but order id) stay below
NEAR_MIN_JACCARD = 0.9       # planted near duplicates: min Jaccard (5-char shingles of masked_text)
LENGTH_RANGE = (150, 600)    # characters of the user message

# --- products: canonical label -> phrases that name it (lower-case, matched on word boundaries)

PRODUCT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "smart_thermostat": ("smart thermostat", "thermostat", "nest-style thermostat",
                         "wifi thermostat", "thermasense t3", "climate controller"),
    "wireless_earbuds": ("wireless earbuds", "earbuds", "bluetooth earbuds", "airpods-style buds",
                         "in-ear headphones", "aurabuds pro", "ear buds"),
    "robot_vacuum": ("robot vacuum", "roomba-style vacuum", "robovac", "vacuum robot",
                     "robot cleaner", "vacubot s7", "robotic vacuum"),
    "fitness_tracker": ("fitness tracker", "fitness band", "activity tracker", "step counter",
                        "fitbit-style band", "fitpulse 2", "smart band"),
    "coffee_maker": ("coffee maker", "coffee machine", "espresso machine", "brewmaster 12",
                     "drip brewer", "coffeemaker"),
    "e_reader": ("e-reader", "ereader", "kindle-style reader", "e-book reader", "ebook reader",
                 "pagelight"),
    "security_camera": ("security camera", "security cam", "surveillance camera",
                        "ring-style camera", "sentrycam 360", "outdoor camera", "doorbell camera"),
    "electric_kettle": ("electric kettle", "kettle", "water boiler", "quickboil",
                        "tea kettle"),
}
# How the products are written in messages (displayed casing; each contains a synonym above).
PRODUCT_PHRASES: dict[str, tuple[str, ...]] = {
    "smart_thermostat": ("smart thermostat", "the thermostat", "my Nest-style thermostat",
                         "wifi thermostat", "ThermaSense T3", "ThermaSense T3 thermostat",
                         "climate controller"),
    "wireless_earbuds": ("wireless earbuds", "earbuds", "bluetooth earbuds", "AirPods-style buds",
                         "in-ear headphones", "AuraBuds Pro", "AuraBuds Pro earbuds", "ear buds"),
    "robot_vacuum": ("robot vacuum", "my Roomba-style vacuum", "robovac", "vacuum robot",
                     "robot cleaner", "VacuBot S7", "robotic vacuum"),
    "fitness_tracker": ("fitness tracker", "fitness band", "activity tracker", "step counter",
                        "Fitbit-style band", "FitPulse 2", "FitPulse 2 tracker", "smart band"),
    "coffee_maker": ("coffee maker", "coffee machine", "espresso machine", "BrewMaster 12",
                     "BrewMaster 12 coffee maker", "drip brewer", "coffeemaker"),
    "e_reader": ("e-reader", "ereader", "Kindle-style reader", "e-book reader", "ebook reader",
                 "PageLight", "PageLight e-reader"),
    "security_camera": ("security camera", "security cam", "surveillance camera",
                        "Ring-style camera", "SentryCam 360", "outdoor camera", "doorbell camera"),
    "electric_kettle": ("electric kettle", "kettle", "water boiler", "QuickBoil kettle",
                        "QuickBoil", "tea kettle"),
}
GENERIC_ITEMS = ("item", "purchase", "product", "device", "gadget", "stuff I bought")

# --- urgency cues (lower-case, matched on word boundaries) -------------------------------------

LOW_CUES = ("no rush", "whenever", "no hurry", "not urgent", "take your time",
            "when you get a chance", "at your convenience", "not time-sensitive", "low priority",
            "no pressure")
HIGH_CUES = ("urgent", "urgently", "asap", "as soon as possible", "immediately", "right away",
             "today", "tonight", "tomorrow", "by friday", "by monday", "this weekend",
             "unacceptable", "ridiculous", "furious", "fed up", "third time", "emergency",
             "angry", "deadline", "within the hour")

HIGH_SENTENCES = (
    "This is urgent!", "URGENT: please deal with this asap.", "I need this sorted ASAP.",
    "Please handle this as soon as possible.", "I need an answer today, please.",
    "I need it by Friday, it's a birthday present.", "Please fix this immediately.",
    "This is the third time I'm writing about this and it's honestly unacceptable.",
    "I'm furious, nobody has gotten back to me.", "Honestly this is ridiculous.",
    "I'm fed up with waiting.", "Need a reply right away.",
    "I'm leaving on a trip tomorrow so I really need this resolved.",
    "Please treat this as urgent.", "This is kind of an emergency for us.",
    "I need this done by Monday at the latest.", "Very angry customer here.",
    "We have guests this weekend, so time matters.", "Please respond tonight if at all possible.",
    "I have a deadline on this, please hurry.", "Can someone call me within the hour?",
    "ASAP please!!", "Really need this urgently.",
)
LOW_SENTENCES = (
    "No rush on this.", "No rush at all, just whenever you can.", "Whenever you get to it is fine.",
    "No hurry, just wanted to ask.", "It's not urgent.", "Not urgent at all, take your time.",
    "Take your time, it's not a big deal.", "Reply when you get a chance.",
    "Respond at your convenience.", "This is not time-sensitive.",
    "Low priority, just curious.", "No pressure, reply whenever.",
    "Not in a hurry, no rush.",
)

# --- intents: body sentences ({prod} = product phrase, {order} = order reference) --------------

BODIES: dict[str, tuple[str, ...]] = {
    "order_status": (
        "Where is {order}? I ordered the {prod} a while back and the tracking page hasn't moved.",
        "Could you tell me the status of {order}? I'm waiting on a {prod}.",
        "I haven't received {order} yet. It was a {prod}.",
        "The tracking for {order} still says 'label created'. When will my {prod} ship?",
        "Has {order} shipped? I bought a {prod} and got no shipping email.",
        "Can you check on {order} for me? The {prod} was supposed to arrive last week.",
        "My {prod} delivery seems stuck in transit. This is about {order}.",
        "Any update on {order}? Still no sign of the {prod}.",
        "I'd like to know when {order} will be delivered, it's the {prod}.",
        "The estimated delivery date for {order} passed and my {prod} never showed up.",
        "Is {order} lost? The carrier site shows nothing for the {prod} since it left the warehouse.",
        "Quick question about {order}: has the {prod} left your warehouse yet?",
        "Wondering where my package is, {order}, with the {prod} inside.",
        "Can I get a tracking number for {order}? It's for a {prod}.",
    ),
    "refund_request": (
        "I want a refund for {order}. The {prod} stopped working after two days.",
        "Please refund {order}, the {prod} arrived damaged.",
        "I returned the {prod} from {order} two weeks ago and still have not been refunded.",
        "I'd like my money back for the {prod}, {order}. It's not what I expected.",
        "Can I get a full refund on {order}? The {prod} is defective.",
        "Requesting a refund for the {prod} in {order}, it doesn't work as advertised.",
        "The {prod} I got ({order}) is broken out of the box, I want a refund please.",
        "How do I get reimbursed for {order}? I sent the {prod} back already.",
        "I was promised a refund for {order} when I shipped back the {prod}, where is it?",
        "Please process a refund for the {prod}, {order}. I no longer want it.",
        "The {prod} from {order} is missing parts. I'd rather have my money back than a replacement.",
        "Could you refund me for {order}? The {prod} was the wrong color.",
        "I need to return the {prod} and get refunded, it's {order}.",
    ),
    "cancel_order": (
        "Please cancel {order}. I ordered the {prod} by mistake.",
        "I want to cancel {order} before it ships, I don't need the {prod} anymore.",
        "Can you cancel {order}? I found the {prod} cheaper elsewhere.",
        "I'd like to cancel my order for the {prod}, {order}.",
        "Cancel {order} please, I accidentally ordered two of the {prod}.",
        "Is it still possible to cancel {order}? Changed my mind about the {prod}.",
        "I placed {order} for a {prod} but I need to cancel it.",
        "Please stop {order} from shipping and cancel it, the {prod} was a duplicate purchase.",
        "How do I cancel {order}? I no longer want the {prod}.",
        "Cancel the {prod}, {order}, before it goes out.",
        "Hoping you can cancel {order}, the {prod} was ordered on the wrong account.",
        "I need {order} cancelled, my partner already bought the same {prod}.",
    ),
    "shipping_address_change": (
        "I need to change the shipping address on {order}. The {prod} should go to {address} instead.",
        "Can you update the delivery address for {order}? Please send the {prod} to {address}.",
        "I moved recently, so please ship {order} ({prod}) to my new address: {address}.",
        "Wrong address on {order}! The {prod} needs to go to {address}.",
        "Please redirect {order} to {address}, I won't be at the old place when the {prod} arrives.",
        "Could you change where {order} is being shipped? New address is {address}. It's the {prod}.",
        "I typed the wrong street on {order}. Correct address for the {prod}: {address}.",
        "Please update {order} so the {prod} is delivered to {address}.",
        "Is it possible to change the ship-to address on {order}? It should be {address}.",
        "Send the {prod} from {order} to my office instead: {address}.",
        "I'd like {order} delivered to a different address, {address}, if the {prod} hasn't shipped.",
        "My address on {order} is outdated. Please use {address} for the {prod}.",
    ),
    "technical_issue": (
        "My {prod} won't connect to wifi anymore. I've tried resetting it twice.",
        "The {prod} keeps turning off by itself after a few minutes.",
        "Since the last firmware update my {prod} doesn't pair with the app.",
        "The {prod} shows an error code E4 and won't start.",
        "My {prod} isn't charging, the light doesn't come on at all.",
        "Something is wrong with the {prod}: it makes a loud clicking noise.",
        "The app says my {prod} is offline even though it's plugged in.",
        "My {prod} froze during setup and now it's stuck on the logo screen.",
        "I can't get the {prod} to sync, it fails every time.",
        "The {prod} battery drains in a couple of hours, that can't be normal.",
        "My {prod} has a blinking red light and doesn't respond to buttons.",
        "After the reset the {prod} no longer remembers any of my settings.",
        "The touchscreen on my {prod} doesn't react to taps anymore.",
        "Bluetooth keeps dropping on the {prod}, it disconnects constantly.",
    ),
    "billing_question": (
        "I was charged twice for {order}. Can you explain the extra charge?",
        "Why does my statement show a different amount than the {prod} price on {order}?",
        "I see a charge from your company I don't recognize. Is this related to {order}?",
        "Can you send me an invoice for {order}? I need it for my expenses.",
        "The promo code wasn't applied to {order}, so I paid full price for the {prod}.",
        "I was billed for shipping on {order} but it was supposed to be free.",
        "Question about my bill: the tax on {order} looks wrong.",
        "Why was my card charged again this month? I thought the {prod} subscription was cancelled.",
        "My payment for {order} went through but the {prod} order says payment pending.",
        "Could you explain the charges on {order}? The total is higher than the checkout page said.",
        "I need a copy of the receipt for the {prod}, {order}.",
        "There's a pending authorization on my card for {order} that never dropped off.",
    ),
    "account_access": (
        "I can't log in to my account. The password reset email never arrives.",
        "My account got locked after too many login attempts.",
        "I forgot my password and the reset link says it has expired.",
        "I'm not able to sign in, it says my email isn't registered, but I bought the {prod} with it.",
        "The two-factor code never comes to my phone so I'm locked out.",
        "Someone changed my account password, I think I was hacked.",
        "I can't access my account to manage the {prod} anymore.",
        "Login keeps failing with 'invalid credentials' even though the password is right.",
        "I need to update the email on my account but I can't get past the login page.",
        "My account page is blank after I sign in, I can't see {order} or anything else.",
        "The app logged me out and won't let me back in to control my {prod}.",
        "I'm getting 'account disabled' when I try to log in.",
        "Every time I enter the verification code the site says it's wrong and sends me back.",
        "I made a second account by accident and now neither one accepts my password.",
        "The login page just spins forever on both my laptop and my phone.",
        "I used to sign in with Google but that option disappeared and I never set a password.",
        "After changing my phone number I can't receive the sign-in text anymore.",
    ),
    "product_inquiry": (
        "Does the {prod} work with Alexa and Google Home?",
        "What's the difference between the {prod} models you sell?",
        "Is the {prod} compatible with older phones?",
        "How long does the battery last on the {prod}?",
        "Do you sell replacement parts for the {prod}?",
        "Is there a warranty on the {prod}, and how long is it?",
        "Does the {prod} come in other colors?",
        "Can the {prod} be used outside the US with a different voltage?",
        "When will the {prod} be back in stock?",
        "Is the {prod} easy to set up for someone who isn't techy?",
        "I'm thinking about buying the {prod}. Does it need a monthly subscription?",
        "What accessories come in the box with the {prod}?",
        "Are you planning a newer version of the {prod} this year?",
    ),
}
# Extra detail sentences per intent (no {prod}; never mention products or urgency cues).
DETAILS: dict[str, tuple[str, ...]] = {
    "order_status": ("It was paid with express shipping.", "The last scan was in Memphis.",
                     "I checked the porch and asked the neighbors.",
                     "It's been about ten days since I ordered.",
                     "The order confirmation email came through fine."),
    "refund_request": ("I still have the original box.", "I already printed the return label.",
                       "I'd prefer the refund on the original payment method.",
                       "The return was dropped off at the post office.",
                       "Support chat told me to email you."),
    "cancel_order": ("The confirmation says it hasn't shipped yet.",
                     "I don't want a store credit, just the cancellation.",
                     "Please confirm by email once it's done.",
                     "I placed it late last night."),
    "shipping_address_change": ("The apartment number was missing.",
                                "I'm staying with family for a few weeks.",
                                "The old address is no longer valid.",
                                "Please confirm the change by email."),
    "technical_issue": ("I already tried unplugging it for a minute.",
                        "The app is on the latest version.", "My router is a couple of years old.",
                        "I followed the troubleshooting guide on your site.",
                        "It worked fine for the first month."),
    "billing_question": ("I've attached nothing but can send a screenshot of the statement.",
                         "My bank says the charge is from your store.",
                         "I'd like the difference credited back.",
                         "The checkout page showed a lower total."),
    "account_access": ("I've checked my spam folder.", "I tried two different browsers.",
                       "I still have access to my email.", "I changed phones last month.",
                       "Clearing cookies didn't help.", "My husband can log in fine on his account.",
                       "I've had this account for years."),
    "product_inquiry": ("I'm comparing a few brands.", "It would be a gift for my parents.",
                        "I read some mixed reviews online.", "I already own one of your other products."),
}
# Intent-neutral context sentences (no products, order ids or urgency cues).
CONTEXTS = ("I bought it from your website back in March.", "I've been a customer for a few years now.",
            "I ordered through the mobile app.", "This is my first time contacting support.",
            "I tried the help center first but couldn't find an answer.",
            "My wife usually handles these things but she's traveling.",
            "I already sent a message through the contact form last week.",
            "I'm writing from my work email because my personal one is acting up.",
            "A friend recommended your store, so I was surprised by this.",
            "I'm not very good with technology, so bear with me.",
            "I spoke to someone on the phone earlier but the call dropped.",
            "Your chat bot sent me here.", "It was a gift for my brother.",
            "I've read the FAQ twice.", "I got a confirmation email with a reference number.",
            "This is for our small office.", "I live in a rural area, if that matters.",
            "I usually love your products.", "Sorry for the long message.",
            "My English is not perfect, sorry.")
GREETINGS = ("Hi,", "Hello,", "Hi there,", "Hey,", "Good morning,", "Good afternoon,",
             "Dear support team,", "Hello support,", "Hey team,", "Hi folks,", "Greetings,",
             "To whom it may concern,", "hey", "hi")
CLOSINGS = ("Thanks.", "Thanks in advance.", "Thank you!", "Appreciate the help.",
            "Thanks for looking into it.", "Let me know what you need from me.",
            "Looking forward to your reply.", "Cheers.", "Thank you for your help.",
            "Any help is appreciated.", "thx", "Kind regards.")
ORDER_WITH_ID = ("order {id}", "order #{id}", "order no. {id}", "my order {id}",
                 "order number {id}", "the order {id}", "my order ({id})")
ORDER_WITHOUT_ID = ("my order", "my recent order", "the order", "my last order",
                    "the order I placed")
# Appended when the chosen body does not name the product but the example has one.
PRODUCT_NOTES = ("It's for my {prod}.", "This is about the {prod}.", "My question is about the {prod}.",
                 "The product is the {prod}.", "I have the {prod}, if that matters.")
NO_ID_NOTES = ("I don't have the order number handy.", "I can't find my order number, sorry.",
               "Not sure what the order number was.")

# --- PII pools (small, hand-written; no faker) -------------------------------------------------

FIRST_NAMES = ("Maria", "James", "Aisha", "Wei", "Carlos", "Emily", "Olusegun", "Priya",
               "Liam", "Sofia", "Mohammed", "Hannah", "Diego", "Yuki", "Noah", "Fatima",
               "Lucas", "Chloe", "Rahul", "Grace", "Mateo", "Elena", "Daniel", "Amara",
               "Kevin", "Ingrid", "Tomás", "Zoë", "Samuel", "Leila", "Patrick", "Mei",
               "Oliver", "Nadia", "Ethan", "Rosa", "Jonas", "Keisha", "Andrew", "Helga")
LAST_NAMES = ("Lopez", "Smith", "Okafor", "Zhang", "Garcia", "Johnson", "Adeyemi", "Patel",
              "Murphy", "Rossi", "Hassan", "Becker", "Fernandez", "Tanaka", "Williams",
              "Khan", "Martin", "Dubois", "Sharma", "Kim", "Silva", "Novak", "Brown", "Mensah",
              "O'Connor", "Larsen", "Müller", "Nguyen", "Cohen", "Ahmed", "Walsh", "Chen",
              "Taylor", "Petrova", "Wright", "Morales", "Schmidt", "Jackson", "Evans", "Berg")
STREETS = ("Maple", "Oak", "Pine", "Cedar", "Elm", "Washington", "Lake", "Hill", "Park",
           "Sunset", "Highland", "Main", "Church", "Mill", "River", "Forest", "Walnut",
           "Chestnut", "Franklin", "Jefferson", "Spring", "Willow", "Madison", "Lincoln")
STREET_TYPES = ("Street", "St", "Avenue", "Ave", "Road", "Rd", "Lane", "Drive", "Dr",
                "Boulevard", "Court", "Way", "Place")
CITIES = (("Portland", "OR", "972"), ("Austin", "TX", "787"), ("Denver", "CO", "802"),
          ("Columbus", "OH", "432"), ("Raleigh", "NC", "276"), ("Madison", "WI", "537"),
          ("Tucson", "AZ", "857"), ("Sacramento", "CA", "958"), ("Boise", "ID", "837"),
          ("Richmond", "VA", "232"), ("Omaha", "NE", "681"), ("Albany", "NY", "122"),
          ("Savannah", "GA", "314"), ("Spokane", "WA", "992"), ("Tampa", "FL", "336"),
          ("Burlington", "VT", "054"), ("Pittsburgh", "PA", "152"), ("Nashville", "TN", "372"))
EMAIL_DOMAINS = ("gmail.com", "outlook.com", "yahoo.com", "proton.me", "icloud.com",
                 "fastmail.com", "hotmail.com", "mail.com")
AREA_CODES = ("212", "415", "312", "617", "206", "512", "303", "404", "503", "614", "919",
              "608", "520", "916", "702", "813")

PII_TYPES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "STREET_ADDRESS", "CREDIT_CARD",
             "US_SSN", "IP_ADDRESS", "IBAN_CODE")


# --- data classes ------------------------------------------------------------------------------

@dataclass
class Example:
    """One generated example (before it is rendered into a file format)."""

    user: str
    labels: dict[str, Any]                 # intent, product, urgency, order_id (reply key order)
    pii: list[tuple[str, str]] = field(default_factory=list)   # (entity type, value) in user
    kind: str = "base"                      # base | exact_dup | near_dup | bad:<kind>
    dup_of: int | None = None               # index (into DemoDataset.examples) of the source
    fmt: str = "messages"                   # messages | alpaca | sharegpt
    instruction: str = ""                   # alpaca only

    @property
    def reply(self) -> str:
        return reply_json(self.labels)


@dataclass
class DemoDataset:
    """All generated examples plus the rendered file contents (name -> text)."""

    examples: list[Example]
    files: dict[str, str]

    def stats(self) -> dict[str, Any]:
        kinds = Counter(e.kind for e in self.examples)
        return {
            "files": {name: self.counts_per_file()[name] for name in FILES},
            "distinct_examples": kinds["base"],
            "exact_duplicates": kinds["exact_dup"],
            "near_duplicates": kinds["near_dup"],
            "bad_records": sum(v for k, v in kinds.items() if k.startswith("bad:")),
            "bad_by_kind": {k[4:]: v for k, v in sorted(kinds.items()) if k.startswith("bad:")},
            "intents": dict(sorted(Counter(e.labels["intent"] for e in self.examples
                                           if not e.kind.startswith("bad:")).items())),
            "bytes": sum(len(t.encode("utf-8")) for t in self.files.values()),
        }

    def counts_per_file(self) -> dict[str, int]:
        by_fmt = Counter(e.fmt for e in self.examples)
        return {MESSAGES_FILE: by_fmt["messages"], ALPACA_FILE: by_fmt["alpaca"],
                SHAREGPT_FILE: by_fmt["sharegpt"]}


class DemoGenerationError(RuntimeError):
    """A generated example violates the demo-data contract (a template bug)."""


# --- label helpers -----------------------------------------------------------------------------

def reply_json(labels: dict[str, Any]) -> str:
    """The assistant reply: compact JSON, keys in the fixed order."""
    return json.dumps({k: labels[k] for k in REPLY_KEYS}, separators=(", ", ": "), ensure_ascii=False)


def _phrase_re(phrases: Sequence[str]) -> re.Pattern[str]:
    alts = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
    return re.compile(rf"(?<![a-z0-9])(?:{alts})(?![a-z0-9])")


_PRODUCT_RES = {p: _phrase_re(s) for p, s in PRODUCT_SYNONYMS.items()}
_LOW_RE = _phrase_re(LOW_CUES)
_HIGH_RE = _phrase_re(HIGH_CUES)


def derive_labels(text: str) -> dict[str, Any]:
    """Labels that follow from the text by the documented rules (intent is not derivable).

    Returns ``{"products": [...], "urgency": ..., "order_ids": [...]}``.
    """
    low = text.lower()
    products = [p for p, rx in _PRODUCT_RES.items() if rx.search(low)]
    if _LOW_RE.search(low):
        urgency = "low"
    elif _HIGH_RE.search(low):
        urgency = "high"
    else:
        urgency = "medium"
    return {"products": products, "urgency": urgency,
            "order_ids": ORDER_ID_IN_TEXT_RE.findall(text)}


def check_example(ex: Example) -> None:
    """Raise :class:`DemoGenerationError` if the text does not determine the labels."""
    got = derive_labels(ex.user)
    lab = ex.labels
    want_products = [] if lab["product"] == "unknown" else [lab["product"]]
    want_ids = [] if lab["order_id"] is None else [lab["order_id"]]
    problems = []
    if got["products"] != want_products:
        problems.append(f"products {got['products']} != {want_products}")
    if got["urgency"] != lab["urgency"]:
        problems.append(f"urgency {got['urgency']} != {lab['urgency']}")
    if sorted(set(got["order_ids"])) != want_ids:
        problems.append(f"order ids {got['order_ids']} != {want_ids}")
    for etype, value in ex.pii:
        if value not in ex.user:
            problems.append(f"{etype} value {value!r} missing from text")
    if not LENGTH_RANGE[0] <= len(ex.user) <= LENGTH_RANGE[1]:
        problems.append(f"length {len(ex.user)} outside {LENGTH_RANGE}")
    if problems:
        raise DemoGenerationError(f"bad demo example ({'; '.join(problems)}): {ex.user!r}")


# --- PII generators ----------------------------------------------------------------------------

def luhn_complete(prefix_digits: str, length: int, rng: random.Random) -> str:
    """Random card number with the given prefix and length whose Luhn checksum is valid."""
    body = prefix_digits + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix_digits) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):     # the check digit will sit to the right
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return body + str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return len(digits) >= 12 and total % 10 == 0


def iban_complete(country: str, bban: str) -> str:
    """IBAN with valid ISO 13616 mod-97 check digits."""
    rearranged = bban + country + "00"
    numeric = "".join(str(int(c, 36)) for c in rearranged)
    return f"{country}{98 - int(numeric) % 97:02d}{bban}"


def iban_valid(iban: str) -> bool:
    s = iban.replace(" ", "")
    numeric = "".join(str(int(c, 36)) for c in s[4:] + s[:4])
    return int(numeric) % 97 == 1


class _Pii:
    """Draws realistic fake PII from the hand-written pools."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def name(self) -> tuple[str, str]:
        return self.rng.choice(FIRST_NAMES), self.rng.choice(LAST_NAMES)

    def email(self, first: str, last: str) -> str:
        r = self.rng
        ascii_first = first.encode("ascii", "ignore").decode().lower() or "user"
        ascii_last = last.encode("ascii", "ignore").decode().lower().replace("'", "") or "mail"
        local = r.choice((f"{ascii_first}.{ascii_last}", f"{ascii_first[0]}{ascii_last}",
                          f"{ascii_first}{r.randrange(10, 99)}", f"{ascii_last}.{ascii_first[0]}",
                          f"{ascii_first}_{ascii_last}{r.randrange(1, 9)}"))
        return f"{local}@{r.choice(EMAIL_DOMAINS)}"

    def phone(self) -> str:
        r = self.rng
        area, exch, line = r.choice(AREA_CODES), r.randrange(201, 990), r.randrange(1000, 10000)
        style = r.randrange(7)
        if style == 0:
            return f"({area}) {exch}-{line}"
        if style == 1:
            return f"{area}-{exch}-{line}"
        if style == 2:
            return f"{area}.{exch}.{line}"
        if style == 3:
            return f"+1 {area} {exch} {line}"
        if style == 4:
            return f"+1-{area}-{exch}-{line}"
        if style == 5:
            return f"+44 20 7{r.randrange(100, 1000)} {r.randrange(1000, 10000)}"
        return f"+49 30 {r.randrange(1000000, 10000000)}"

    def address(self) -> str:
        r = self.rng
        city, state, zip3 = r.choice(CITIES)
        street = f"{r.randrange(12, 9800)} {r.choice(STREETS)} {r.choice(STREET_TYPES)}"
        if r.random() < 0.3:
            street += r.choice((f", Apt {r.randrange(1, 40)}{r.choice('ABCD')}",
                                f" Unit {r.randrange(100, 999)}", f", Suite {r.randrange(100, 600)}"))
        return f"{street}, {city}, {state} {zip3}{r.randrange(10, 100)}"

    def card(self) -> str:
        r = self.rng
        kind = r.randrange(3)
        if kind == 0:
            num = luhn_complete("4", 16, r)
        elif kind == 1:
            num = luhn_complete(str(r.randrange(51, 56)), 16, r)
        else:
            num = luhn_complete(r.choice(("34", "37")), 15, r)
        style = r.randrange(3)
        if len(num) == 15:
            groups = [num[:4], num[4:10], num[10:]]
        else:
            groups = [num[i:i + 4] for i in range(0, 16, 4)]
        return (" ", "-", "")[style].join(groups)

    def ssn(self) -> str:
        r = self.rng
        area = r.choice([a for a in range(101, 900) if a != 666])
        group, serial = r.randrange(1, 100), r.randrange(1, 10000)
        sep = r.choice(("-", "-", " "))
        return f"{area:03d}{sep}{group:02d}{sep}{serial:04d}"

    def ip(self) -> str:
        r = self.rng
        if r.random() < 0.3:
            return f"192.168.{r.randrange(0, 3)}.{r.randrange(2, 250)}"
        return f"{r.randrange(23, 200)}.{r.randrange(0, 256)}.{r.randrange(0, 256)}.{r.randrange(1, 255)}"

    def iban(self) -> str:
        r = self.rng
        country = r.choice(("DE", "GB", "NL", "DE"))
        if country == "DE":
            bban = "".join(str(r.randrange(10)) for _ in range(18))
        elif country == "GB":
            bban = r.choice(("NWBK", "BARC", "LOYD", "HBUK")) + "".join(str(r.randrange(10)) for _ in range(14))
        else:
            bban = r.choice(("ABNA", "INGB", "RABO")) + "".join(str(r.randrange(10)) for _ in range(10))
        iban = iban_complete(country, bban)
        if r.random() < 0.5:
            iban = " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
        return iban


# --- message composition -----------------------------------------------------------------------

# Probability that a message names a product / carries an order id, per intent.
P_PRODUCT = {"order_status": 0.7, "refund_request": 0.8, "cancel_order": 0.7,
             "shipping_address_change": 0.55, "technical_issue": 0.9, "billing_question": 0.45,
             "account_access": 0.35, "product_inquiry": 0.85}
P_ORDER_ID = {"order_status": 0.75, "refund_request": 0.65, "cancel_order": 0.7,
              "shipping_address_change": 0.7, "technical_issue": 0.3, "billing_question": 0.5,
              "account_access": 0.15, "product_inquiry": 0.08}
URGENCY_WEIGHTS = (("low", 0.27), ("medium", 0.43), ("high", 0.30))
_TYPO_PROTECT = re.compile(r"\{[a-z]+\}")


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 5 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 2)
    op = rng.randrange(3)
    if op == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]     # swap
    if op == 1:
        return word[:i] + word[i + 1:]                               # drop
    return word[:i] + word[i] + word[i:]                             # double


def _add_typos(template: str, rng: random.Random, n: int) -> str:
    """Put ``n`` typos into plain words of a template (never into {slots})."""
    tokens = re.split(r"(\s+)", template)
    idx = [i for i, t in enumerate(tokens) if t.isalpha() and len(t) >= 5 and not _TYPO_PROTECT.search(t)]
    for i in rng.sample(idx, min(n, len(idx))):
        tokens[i] = _typo(tokens[i], rng)
    return "".join(tokens)


def _casual(template: str) -> str:
    """Lower-case, chatty version of a template ({slots} kept)."""
    out = template.replace("I'm", "im").replace("don't", "dont").replace("can't", "cant")
    out = out.replace("Please", "pls").replace("please", "pls").replace("you", "u")
    out = re.sub(r"\byour\b", "ur", out)
    return out[0].lower() + out[1:]


def _order_ref(order_id: str | None, rng: random.Random) -> str:
    if order_id is None:
        return rng.choice(ORDER_WITHOUT_ID)
    return rng.choice(ORDER_WITH_ID).format(id=order_id)


def _new_order_id(rng: random.Random, used: set[str]) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    while True:
        oid = rng.choice(letters) + rng.choice(letters) + f"{rng.randrange(100000, 1000000)}"
        if oid not in used:
            used.add(oid)
            return oid


def _compose(intent: str, rng: random.Random, pii: _Pii, used_ids: set[str]) -> Example:
    """Draw labels, then write a message that states them."""
    product = rng.choice(PRODUCTS[:-1]) if rng.random() < P_PRODUCT[intent] else "unknown"
    order_id = _new_order_id(rng, used_ids) if rng.random() < P_ORDER_ID[intent] else None
    urgency = rng.choices([u for u, _ in URGENCY_WEIGHTS], [w for _, w in URGENCY_WEIGHTS])[0]
    labels = {"intent": intent, "product": product, "urgency": urgency, "order_id": order_id}
    found: list[tuple[str, str]] = []
    casual = rng.random() < 0.15

    body = rng.choice(BODIES[intent]).replace(" a {prod}", " the {prod}")
    if "{order}" not in body and order_id is not None:
        body += " " + rng.choice(("It's {order}.", "This is about {order}.", "Ref: {order}.",
                                  "(That's {order}.)"))
    if "{prod}" not in body and product != "unknown":
        body += " " + rng.choice(PRODUCT_NOTES)
    if casual:
        body = _casual(body)
    if rng.random() < 0.25:
        body = _add_typos(body, rng, rng.choice((1, 1, 2)))
    prod = rng.choice(PRODUCT_PHRASES[product]) if product != "unknown" else rng.choice(GENERIC_ITEMS)
    if prod.startswith(("my ", "the ")) and re.search(r"(?i)\b(?:my|the|a)\s+\{prod\}", body):
        prod = prod.split(" ", 1)[1]
    fill = {"prod": prod, "order": _order_ref(order_id, rng)}
    if "{address}" in body:
        fill["address"] = pii.address()
        found.append(("STREET_ADDRESS", fill["address"]))
    body = body.format(**fill)
    body = body[0].upper() + body[1:] if not casual else body

    parts: list[str] = []
    first, last = pii.name()
    full = f"{first} {last}"
    if rng.random() < 0.8:
        parts.append(rng.choice(GREETINGS))
    if rng.random() < 0.4:
        parts.append(rng.choice((f"My name is {full}.", f"This is {full}.", f"{full} here.")))
        found.append(("PERSON", full))
    if rng.random() < 0.35:
        parts.append(rng.choice(CONTEXTS))
    parts.append(body)
    for detail in rng.sample(DETAILS[intent], rng.choice((0, 1, 1, 2, 2))):
        parts.append(detail)
    if rng.random() < 0.25:
        parts.append(rng.choice(CONTEXTS))
    if order_id is None and intent in ("order_status", "refund_request", "cancel_order") and rng.random() < 0.3:
        parts.append(rng.choice(NO_ID_NOTES))
    if urgency == "high":
        parts.append(rng.choice(HIGH_SENTENCES))
    elif urgency == "low":
        parts.append(rng.choice(LOW_SENTENCES))

    # Intent-specific PII.
    if intent in ("refund_request", "billing_question") and rng.random() < 0.22:
        iban = pii.iban()
        parts.append(rng.choice((f"Please send the money to my IBAN {iban}.",
                                 f"My bank account (IBAN): {iban}", f"IBAN for the transfer: {iban}.")))
        found.append(("IBAN_CODE", iban))
    if intent in ("billing_question", "refund_request", "cancel_order") and rng.random() < 0.2:
        card = pii.card()
        parts.append(rng.choice((f"The card I paid with is {card}.", f"Card used: {card}",
                                 f"It was charged to my card {card}.")))
        found.append(("CREDIT_CARD", card))
    if intent in ("account_access", "billing_question") and rng.random() < 0.15:
        ssn = pii.ssn()
        parts.append(rng.choice((f"If you need to verify me, my SSN is {ssn}.",
                                 f"SSN for verification: {ssn}", f"My social security number is {ssn}.")))
        found.append(("US_SSN", ssn))
    if intent in ("technical_issue", "account_access") and rng.random() < 0.3:
        ip = pii.ip()
        parts.append(rng.choice((f"My IP address is {ip} if that helps.", f"The device shows IP {ip}.",
                                 f"Logs mention my IP {ip}.")))
        found.append(("IP_ADDRESS", ip))
    if intent != "shipping_address_change" and rng.random() < 0.1:
        addr = pii.address()
        parts.append(rng.choice((f"I live at {addr}.", f"My address is {addr}.")))
        found.append(("STREET_ADDRESS", addr))

    # Contact details and sign-off.
    if rng.random() < 0.5:
        email = pii.email(first, last)
        parts.append(rng.choice((f"You can reach me at {email}.", f"Email: {email}",
                                 f"My account email is {email}.", f"Contact me at {email}")))
        found.append(("EMAIL_ADDRESS", email))
    if rng.random() < 0.35:
        phone = pii.phone()
        parts.append(rng.choice((f"Call me at {phone}.", f"Phone: {phone}", f"My number is {phone}.",
                                 f"You can text me on {phone}.")))
        found.append(("PHONE_NUMBER", phone))
    if rng.random() < 0.75:
        parts.append(rng.choice(CLOSINGS))
    if rng.random() < 0.7:
        signoff = rng.choice((f"- {first}", full, f"Best, {full}", f"Regards,\n{full}", first,
                              f"Thanks,\n{first} {last[0]}."))
        found.append(("PERSON", full if full in signoff else first))
        parts.append(signoff)

    sep = rng.choice((" ", " ", "\n", "\n\n")) if len(parts) > 3 else " "
    text = sep.join(parts) if not casual else " ".join(parts)
    return Example(user=text, labels=labels, pii=found)


_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The dedup stage's text normalisation: NFKC, casefold, whitespace runs -> one space."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _shingles(text: str, k: int = 5) -> set[str]:
    return {text[i:i + k] for i in range(max(1, len(text) - k + 1))}


def masked_text(ex: Example) -> str:
    """What minhash-dedup compares: normalised user + reply, each planted PII value replaced
    by its type first (as pii-scrub does)."""
    text = ex.user
    for etype, value in sorted(ex.pii, key=lambda p: len(p[1]), reverse=True):
        text = text.replace(value, f"<{etype}>")
    return normalize(text) + "\n" + normalize(ex.reply)


def jaccard(a: str, b: str, k: int = 5) -> float:
    sa, sb = _shingles(a, k), _shingles(b, k)
    return len(sa & sb) / len(sa | sb)


# Near-duplicate edits: each changes only filler (never cues, PII, products or order ids).
_WORD_SWAPS = (("Thanks", "Thank you"), ("Thank you", "Thanks"), ("please", "pls"),
               ("Please", "Could you please"), ("I'm", "I am"), ("can't", "cannot"),
               ("don't", "do not"), ("It's", "It is"), ("haven't", "have not"),
               ("I want", "I would like"), ("I'd like", "I would like"), ("Hi", "Hello"),
               ("Hello", "Hi"), ("Can you", "Could you"), ("Could you", "Can you"),
               ("a while back", "some time ago"), ("again", "once more"), ("anymore", "any more"))


def _near_edit(text: str, rng: random.Random) -> str:
    op = rng.randrange(5)
    if op == 0:
        return rng.choice(("Hello again! ", "Hi there, ", "Good evening. ", "Hey, ")) + text
    if op == 1:
        swaps = [(a, b) for a, b in _WORD_SWAPS if re.search(rf"\b{re.escape(a)}\b", text)]
        if swaps:
            a, b = rng.choice(swaps)
            return re.sub(rf"\b{re.escape(a)}\b", b, text, count=1)
        return text + " Thanks again."
    if op == 2:
        spots = [m.start() for m in re.finditer(r"[a-z]\. [A-Z]", text)]
        if spots:
            i = rng.choice(spots) + 1
            return text[:i] + rng.choice(("!", "...", ",", " -")) + text[i + 1:]
        return text + "!"
    if op == 3:
        return text[0].swapcase() + text[1:]
    return text.rstrip(".!") + rng.choice((" :)", "!", ".", " ??", " - thanks"))


def _make_near(src: Example, rng: random.Random) -> Example:
    for _ in range(50):
        text = src.user
        for _ in range(rng.choice((1, 2, 2))):
            text = _near_edit(text, rng)
        cand = Example(user=text, labels=dict(src.labels), pii=list(src.pii), kind="near_dup")
        if normalize(text) == normalize(src.user):     # case/whitespace only: an exact duplicate
            continue
        try:
            check_example(cand)
        except DemoGenerationError:
            continue
        if jaccard(masked_text(cand), masked_text(src)) >= NEAR_MIN_JACCARD:
            return cand
    raise DemoGenerationError(f"could not make a near duplicate of {src.user!r}")


# --- bad records -------------------------------------------------------------------------------

def _bad_line(kind: str, ex: Example, variant: int = 0) -> str:
    sys_msg = {"role": "system", "content": SYSTEM_PROMPT}
    user = {"role": "user", "content": ex.user}
    meta = {"intent": ex.labels["intent"]}
    if kind == "empty_reply":
        msgs = [sys_msg, user, {"role": "assistant", "content": ""}]
    elif kind == "ends_with_user":
        msgs = [sys_msg, user, {"role": "assistant", "content": ex.reply},
                {"role": "user", "content": "Hello? Anyone there?"}]
    elif kind == "unknown_role":
        msgs = [sys_msg, {"role": "customer", "content": ex.user}, {"role": "assistant", "content": ex.reply}]
    elif kind == "short_reply":
        msgs = [sys_msg, user, {"role": "assistant", "content": "ok"}]
    elif kind == "malformed_json":      # four kinds of broken JSON lines, by ``variant``
        obj = {"messages": [sys_msg, user, {"role": "assistant", "content": ex.reply}], "metadata": meta}
        full = json.dumps(obj, ensure_ascii=False, sort_keys=True)
        if variant % 4 == 0:
            return full[: len(full) // 2]                     # truncated mid-string
        if variant % 4 == 1:
            return repr(obj)                                  # Python repr: single quotes, None
        if variant % 4 == 2:
            return full[:-1] + ",}"                           # trailing comma
        return full[:-1]                                      # missing closing brace
    else:
        raise ValueError(f"unknown bad-record kind {kind!r}")
    return json.dumps({"messages": msgs, "metadata": meta}, ensure_ascii=False, sort_keys=True)


# --- rendering ---------------------------------------------------------------------------------

def _messages_record(ex: Example) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": ex.user},
                         {"role": "assistant", "content": ex.reply}],
            "metadata": {"intent": ex.labels["intent"]}}


def _sharegpt_record(ex: Example) -> dict[str, Any]:
    return {"conversations": [{"from": "system", "value": SYSTEM_PROMPT},
                              {"from": "human", "value": ex.user},
                              {"from": "gpt", "value": ex.reply}],
            "metadata": {"intent": ex.labels["intent"]}}


def _alpaca_record(ex: Example) -> dict[str, Any]:
    return {"instruction": ex.instruction, "input": ex.user, "output": ex.reply,
            "metadata": {"intent": ex.labels["intent"]}}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


# --- generation --------------------------------------------------------------------------------

def generate(seed: int = DEFAULT_SEED) -> DemoDataset:
    """Generate the whole demo data set in memory (deterministic in ``seed``)."""
    rng = random.Random(seed)
    pii = _Pii(rng)
    used_ids: set[str] = set()
    seen_users: set[str] = set()      # masked_text of every example drawn so far
    shingle_groups: dict[tuple[str, str, str], list[set[str]]] = {}
    n_total = sum(N_BASE.values())

    # 1. Distinct examples, intents balanced (round robin), then assigned to formats.
    base: list[Example] = []
    attempts = 0
    while len(base) < n_total:
        attempts += 1
        if attempts > n_total * 20:
            raise DemoGenerationError("too many rejected drafts; templates are too narrow")
        intent = INTENTS[len(base) % len(INTENTS)]
        ex = _compose(intent, rng, pii, used_ids)
        if masked_text(ex) in seen_users or not LENGTH_RANGE[0] <= len(ex.user) <= LENGTH_RANGE[1]:
            continue
        check_example(ex)
        key = (intent, ex.labels["product"], ex.labels["urgency"])
        sh = _shingles(masked_text(ex))
        if any(len(sh & o) / len(sh | o) >= MAX_BASE_JACCARD for o in shingle_groups.setdefault(key, [])):
            continue      # too close to an earlier example: dedup would (rightly) call it a duplicate
        shingle_groups[key].append(sh)
        seen_users.add(masked_text(ex))
        base.append(ex)
    rng.shuffle(base)
    fmts = [f for f, n in N_BASE.items() for _ in range(n)]
    for ex, fmt in zip(base, fmts):
        ex.fmt = fmt
        if fmt == "alpaca":
            ex.instruction = rng.choice(ALPACA_INSTRUCTIONS)

    examples: list[Example] = list(base)
    by_fmt = {f: [i for i, e in enumerate(base) if e.fmt == f] for f in N_BASE}
    taken: set[int] = set()     # each base example is the source of at most one planted copy

    def pick(fmt: str) -> int:
        pool = [i for i in by_fmt[fmt] if i not in taken]
        i = rng.choice(pool)
        taken.add(i)
        return i

    # 2. Exact duplicates (identical conversation; alpaca copies keep their instruction).
    for (src_fmt, dst_fmt), n in N_EXACT.items():
        for _ in range(n):
            i = pick(src_fmt)
            s = base[i]
            examples.append(Example(user=s.user, labels=dict(s.labels), pii=list(s.pii),
                                    kind="exact_dup", dup_of=i, fmt=dst_fmt, instruction=s.instruction))

    # 3. Near duplicates.
    for (src_fmt, dst_fmt), n in N_NEAR.items():
        for _ in range(n):
            i = pick(src_fmt)
            near = _make_near(base[i], rng)
            near.dup_of, near.fmt, near.instruction = i, dst_fmt, base[i].instruction
            examples.append(near)

    # 4. Bad records (fresh examples, so they never collide with good ones).
    bad_lines: list[tuple[int, str]] = []
    for kind in BAD_KINDS:
        for variant in range(N_BAD_PER_KIND):
            while True:
                ex = _compose(INTENTS[rng.randrange(len(INTENTS))], rng, pii, used_ids)
                if masked_text(ex) not in seen_users and LENGTH_RANGE[0] <= len(ex.user) <= LENGTH_RANGE[1]:
                    break
            seen_users.add(masked_text(ex))
            ex.kind, ex.fmt = f"bad:{kind}", "messages"
            examples.append(ex)
            bad_lines.append((len(examples) - 1, _bad_line(kind, ex, variant)))
    bad_by_index = dict(bad_lines)

    # 5. Render each file in a shuffled (but seeded) order so duplicates are spread out.
    order = list(range(len(examples)))
    rng.shuffle(order)
    lines: dict[str, list[str]] = {"messages": [], "sharegpt": []}
    alpaca: list[dict[str, Any]] = []
    for i in order:
        ex = examples[i]
        if i in bad_by_index:
            lines["messages"].append(bad_by_index[i])
        elif ex.fmt == "messages":
            lines["messages"].append(_dumps(_messages_record(ex)))
        elif ex.fmt == "sharegpt":
            lines["sharegpt"].append(_dumps(_sharegpt_record(ex)))
        else:
            alpaca.append(_alpaca_record(ex))
    files = {
        MESSAGES_FILE: "".join(line + "\n" for line in lines["messages"]),
        SHAREGPT_FILE: "".join(line + "\n" for line in lines["sharegpt"]),
        ALPACA_FILE: json.dumps(alpaca, ensure_ascii=False, sort_keys=True, indent=1) + "\n",
        safety_demo.FILE: safety_demo.render(safety_demo.generate()),
    }
    return DemoDataset(examples=examples, files=files)


def write(dataset: DemoDataset, out_dir: str | Path) -> list[Path]:
    """Write the rendered files into ``out_dir`` atomically (UTF-8, LF line ends)."""
    out = Path(out_dir)
    written = []
    for name in ALL_FILES:
        path = out / name
        with atomic_path(path) as tmp:
            tmp.write_bytes(dataset.files[name].encode("utf-8"))
            tmp.chmod(0o644)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmpipe.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/raw", help="output directory (default: data/raw)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED,
                    help=f"random seed (default {DEFAULT_SEED}; the committed data uses the default)")
    args = ap.parse_args(argv)
    print(f"demo: generating support-triage data (seed {args.seed}) ...", file=sys.stderr)
    ds = generate(args.seed)
    for path in write(ds, args.out):
        print(f"demo: wrote {path}", file=sys.stderr)
    print("demo: " + json.dumps(ds.stats(), sort_keys=True), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
