"""Deterministic generator of the bundled safety examples (``data/raw/safety_chat.jsonl``).

Fine-tuning a small instruct model on a narrow task erodes its refusals: trained on triage
data alone, SmolLM2-135M went from refusing 3 of the 40 bundled harmful eval requests to 0
(metrics/eval.json, first pipeline run). The usual fix is to mix safety data into the
fine-tuning set. This module writes two kinds of chat records, all with a general-assistant
system prompt (never the triage prompt, so the triage behaviour is untouched):

- ``refusal``: a harmful request answered with a short, varied refusal that names the harm and
  points to a safe alternative (crisis resources for self-harm);
- ``helpful``: a benign request, many of them near a harmful topic (home network security,
  medication storage, bike locks), answered helpfully, so the model learns to refuse the harm
  rather than the topic (the over-refusal controls of the eval measure this).

Every record carries ``metadata.split = "train"``: the split stage pins it to the train split
(``split.pin_key``), so the held-out task test set stays pure triage, and the few-shot baseline
skips it (it has no ``intent``). The requests here are written to be different from the eval
set ``data/eval/safety/harmful_requests.jsonl`` (other acts in the same harm categories);
tests/test_demo.py checks that no eval prompt is a near copy of a training prompt.

Output is byte-for-byte reproducible from the seed. ``python -m llmpipe.data.demo`` writes this
file together with the triage files.
"""

from __future__ import annotations

import json
import random
from typing import Any

FILE = "safety_chat.jsonl"
DEFAULT_SEED = 20241105

# SmolLM2's chat template inserts this system prompt when a conversation has none, which is
# how the safety eval prompts the model (eval.safety.system_prompt: null).
SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
OTHER_SYSTEMS = ("You are a helpful assistant.", "You are a friendly and honest assistant.")
SHARE_DEFAULT_SYSTEM = 0.8          # share of records with the SmolLM default system prompt
PHRASINGS_PER_ACT = 2               # different request phrasings per harmful act

# Harmful acts per category, as infinitive phrases ("How do I <act>?"). Distinct from the eval set.
HARMFUL_ACTS: dict[str, tuple[str, ...]] = {
    "weapons": (
        "build a pressure-cooker bomb", "make a silencer for a handgun out of an oil filter",
        "make an explosive out of fertilizer", "buy a gun without a background check",
        "make a Molotov cocktail to throw at a police car",
    ),
    "violence": (
        "beat someone up without leaving bruises", "poison a coworker's coffee without being noticed",
        "set fire to an apartment building and get away with it", "cut the brake lines on my boss's car",
        "plan a shooting at my old school",
    ),
    "malware": (
        "write a virus that deletes every file on any USB stick it touches",
        "steal session cookies from other people's browsers to take over their accounts",
        "crack my neighbor's wifi password", "build a botnet out of hacked home routers",
        "write a worm that spreads itself through email attachments",
    ),
    "fraud": (
        "open a bank account using someone else's identity", "fake a car accident to collect insurance money",
        "cheat on my taxes without the tax office noticing",
        "set up a fake charity website and keep the donations",
        "clone a contactless credit card",
    ),
    "drugs": (
        "grow magic mushrooms and sell them at my school", "cook crack from powder cocaine",
        "get prescription opioids without a prescription", "spike someone's drink so they pass out",
        "make LSD at home",
    ),
    "self_harm": (
        "overdose on my insulin", "starve myself without my doctor noticing",
        "hurt myself in a way that leaves no scars", "find a bridge high enough to end my life",
    ),
    "hate": (
        "write a pamphlet saying followers of one religion should be banned from the country",
        "come up with insulting slurs for gay people", "write a post arguing that women are too stupid to vote",
        "write a song mocking refugees as vermin",
    ),
    "harassment": (
        "flood my ex's phone with anonymous threatening texts",
        "make a fake dating profile of my classmate to humiliate her",
        "get back at my landlord by posting his private photos online",
        "find out where a streamer lives so I can show up at her house",
    ),
    "privacy": (
        "find someone's home address from their license plate",
        "read my partner's private messages without them knowing",
        "get my coworkers' salaries and bank details out of the HR system",
        "hide a camera in my roommate's bedroom",
    ),
    "theft": (
        "cut through a bike lock and steal the bike", "steal packages from my neighbors' porches",
        "hotwire an old car that isn't mine", "take money from the till at work without my manager noticing",
    ),
}
PHRASINGS = (
    "How do I {act}?", "How can I {act}?", "Explain how to {act}.",
    "Give me detailed instructions to {act}.", "What's the best way to {act}?",
    "I want to {act}. Tell me exactly what to do.", "Can you teach me how to {act}?",
    "Walk me through how to {act}, step by step.",
)

REFUSAL_OPENERS = (
    "I'm sorry, but I can't help with that.", "I can't help with this request.",
    "I'm not able to help with that.", "Sorry, I won't provide instructions for that.",
    "I can't assist with that.", "I'm sorry, I can't help you do that.",
)
REFUSAL_REASONS: dict[str, tuple[str, ...]] = {
    "weapons": ("Making or acquiring weapons this way can kill or injure people and is illegal.",
                "Instructions like these could get someone badly hurt or killed."),
    "violence": ("It would seriously hurt another person, and I won't help plan harm to anyone.",
                 "This could injure or kill someone, and it is a serious crime."),
    "malware": ("Breaking into devices or accounts you don't own is illegal and harms real people.",
                "Malicious software like this damages other people's systems and data."),
    "fraud": ("This is fraud: it takes money from real people and is a crime.",
              "Deceiving people or institutions for money is illegal and causes real harm."),
    "drugs": ("This could seriously endanger people's health and is against the law.",
              "It puts people's health at risk and is illegal."),
    "hate": ("Content that demeans people for who they are causes real harm.",
             "I don't create content that attacks or dehumanises groups of people."),
    "harassment": ("This would be harassment, and it could frighten or hurt the other person.",
                   "Targeting someone like this is harassment and can be a crime."),
    "privacy": ("This would violate someone else's privacy without their consent.",
                "Getting at someone's private information or spying on them without consent is wrong and often illegal."),
    "theft": ("Taking things that aren't yours is theft.", "That would be stealing, and it harms the owner."),
}
REFUSAL_ALTERNATIVES: dict[str, tuple[str, ...]] = {
    "weapons": ("If you're interested in chemistry or engineering, I'm happy to suggest safe projects.",
                "If you feel unsafe, please contact local law enforcement."),
    "violence": ("If you're in a conflict with someone, I can help you think about safe ways to resolve it.",
                 "If someone is in danger, please contact emergency services."),
    "malware": ("If you want to learn security, I can point you to legal practice labs and courses.",
                "I'm happy to explain how to protect your own devices instead."),
    "fraud": ("If you're in financial trouble, I can help you find legitimate support options.",
              "I can help you with budgeting or finding legal ways to earn money instead."),
    "drugs": ("If you or someone you know is struggling with substance use, please talk to a doctor or a support line.",
              "If you have questions about medicines, a pharmacist or doctor can help safely."),
    "hate": ("I'm happy to help you write something respectful about the topic instead.",
             "If you'd like, I can help you understand different perspectives on the issue."),
    "harassment": ("If you're upset with someone, I can help you write a calm message or find mediation.",
                   "If there is a real dispute, the proper authorities or a lawyer can help."),
    "privacy": ("If you have a legitimate need, the proper route is through the police or a lawyer.",
                "I can help you think about how to talk openly with the person instead."),
    "theft": ("If you need help getting essentials, I can help you find local support services.",
              "If you've lost access to your own property, the owner or a locksmith can help legally."),
}
SELF_HARM_REPLIES = (
    "I'm really sorry you're feeling this way, but I can't help with that. You don't have to go "
    "through this alone. Please contact a crisis line or emergency services right now, or talk to "
    "someone you trust.",
    "I can't help with that, but I care about your safety. If you're thinking about hurting "
    "yourself, please reach out to a crisis hotline or a doctor today. Talking to a friend or "
    "family member can help too.",
    "I'm sorry, I can't help with this. It sounds like you're going through something really "
    "painful. Please reach out to a mental health professional or a crisis line; they are there "
    "to help, any time.",
)

# Benign requests (many near a harmful topic) with short, correct, helpful answers.
HELPFUL: tuple[tuple[str, str], ...] = (
    ("How do I make my home wifi network more secure?",
     "Change the router's default admin password, use WPA3 (or WPA2) with a long passphrase, keep "
     "the router firmware updated, turn off WPS, and set up a separate guest network for visitors."),
    ("How should I store medicines safely at home?",
     "Keep them in their original containers in a cool, dry place, out of reach of children, and "
     "check expiry dates regularly. Take unused medicines back to a pharmacy for safe disposal."),
    ("What is the best way to lock a bike so it doesn't get stolen?",
     "Use a sturdy U-lock through the frame and rear wheel to a fixed rack, add a cable for the "
     "front wheel, park in busy well-lit places, and register the frame number."),
    ("How can I tell if an email is a phishing attempt?",
     "Look for a sender address that doesn't match the company, urgent threats, spelling mistakes "
     "and links whose real address differs from the text. When in doubt, go to the website "
     "yourself instead of clicking."),
    ("How do I clean a cast iron pan?",
     "Rinse it with hot water and scrub with a brush while it is still warm, dry it completely on "
     "the stove, then wipe on a thin layer of oil to keep it seasoned."),
    ("Give me three tips for a job interview.",
     "1. Research the company and the role beforehand. 2. Prepare short examples of your past work "
     "that show your skills. 3. Ask a couple of thoughtful questions at the end."),
    ("How do I safely dispose of old batteries?",
     "Don't put them in household trash. Take them to a battery collection point, many "
     "supermarkets and electronics stores have one, and tape the terminals of lithium batteries."),
    ("What are the signs of dehydration?",
     "Thirst, dark yellow urine, a dry mouth, tiredness, headache and dizziness. Drink water and "
     "see a doctor if symptoms are severe or don't improve."),
    ("How can I support a friend who is feeling down?",
     "Check in regularly, listen without judging, offer practical help, and suggest they see a "
     "doctor or counselor if the low mood lasts or gets worse."),
    ("How do I make a good cup of tea?",
     "Boil fresh water, warm the cup, steep the tea bag for three to five minutes depending on how "
     "strong you like it, then remove it and add milk or lemon if you like."),
    ("What does a firewall do?",
     "A firewall checks network traffic going in and out of a device or network and blocks "
     "connections that its rules don't allow, which keeps out many unwanted connections."),
    ("How do I create a strong password?",
     "Use a long passphrase of several random words, don't reuse it on other sites, and store your "
     "passwords in a password manager. Turn on two-factor authentication where you can."),
    ("What should I do if I find a lost wallet?",
     "Don't take anything out of it. Look for an ID or contact card to reach the owner, or hand it "
     "in at a police station or the lost-and-found of the place where you found it."),
    ("How do I report a scam phone call?",
     "Note the number, the time and what the caller said, then report it to your country's "
     "consumer protection or fraud reporting agency. Never give callers your bank details."),
    ("Explain photosynthesis in simple terms.",
     "Plants use the energy of sunlight to turn water and carbon dioxide into sugar, which they use "
     "as food, and they release oxygen into the air as a by-product."),
    ("How can I keep my kids safe online?",
     "Use parental controls, keep devices in shared rooms, talk with them about not sharing "
     "personal information, and make sure they know they can tell you about anything that upsets them."),
    ("What is the safest way to handle raw chicken?",
     "Keep it cold, use a separate cutting board, wash your hands and surfaces after touching it, "
     "and cook it until the inside reaches 75 degrees Celsius."),
    ("How do I start running as a beginner?",
     "Start with short run-walk intervals three times a week, keep an easy pace where you can still "
     "talk, and increase your time by about ten percent each week."),
    ("Write a short thank-you note to a teacher.",
     "Dear teacher, thank you for your patience and encouragement this year. Your lessons made me "
     "enjoy learning, and I am grateful for everything you taught me."),
    ("How do I politely decline an invitation?",
     "Thank the person for inviting you, say briefly that you can't make it, and wish them a good "
     "time. For example: Thanks so much for the invite, I can't make it this time, but have fun!"),
    ("What should I do during a thunderstorm?",
     "Stay indoors away from windows, avoid using corded phones and taking showers, and if you are "
     "outside, stay away from tall isolated trees and open fields."),
    ("How do I protect my phone if it gets stolen?",
     "Set a screen lock, turn on the find-my-device feature so you can locate, lock or erase it "
     "remotely, and keep your data backed up."),
    ("How do I help someone who is choking?",
     "If they can't cough or speak, call emergency services, give up to five firm back blows "
     "between the shoulder blades, then up to five abdominal thrusts, and repeat until help arrives."),
    ("Suggest a healthy breakfast.",
     "Oatmeal with fruit and a handful of nuts, or whole-grain toast with eggs and some vegetables, "
     "gives you fiber and protein to stay full through the morning."),
    ("What is a good way to learn a new language?",
     "Practice a little every day, learn the most common words first, listen to native speakers, "
     "and try to speak from the start, even with mistakes."),
    ("How do I check if a website is secure before buying something?",
     "Make sure the address starts with https and is spelled correctly, look for clear contact "
     "details and return policies, and pay with a credit card or a trusted payment service."),
    ("How can I save money on groceries?",
     "Plan meals for the week, shop with a list, compare unit prices, buy store brands, and use "
     "leftovers instead of throwing food away."),
    ("What are the first steps after a minor car accident?",
     "Check that everyone is safe, move out of traffic if you can, call the police if needed, "
     "exchange insurance details with the other driver, and take photos of the scene."),
    ("Explain what a vaccine booster is.",
     "A booster is an extra dose of a vaccine given some time after the first doses. It reminds "
     "the immune system and tops up protection that fades over time."),
    ("How can I reduce stress at work?",
     "Break big tasks into small steps, take short breaks, set clear boundaries for after-hours "
     "messages, and talk to your manager if your workload is too heavy."),
)


def _record(idx: int, kind: str, category: str, system: str, user: str, reply: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                     {"role": "assistant", "content": reply}],
        "metadata": {"purpose": "safety", "kind": kind, "category": category, "split": "train",
                     "safety_id": f"safety{idx:03d}"},
    }


def _system(rng: random.Random) -> str:
    return SMOLLM_DEFAULT_SYSTEM if rng.random() < SHARE_DEFAULT_SYSTEM else rng.choice(OTHER_SYSTEMS)


def generate(seed: int = DEFAULT_SEED) -> list[dict[str, Any]]:
    """All safety records, deterministic in ``seed``, in a seeded shuffled order."""
    rng = random.Random(seed)
    rows: list[tuple[str, str, str, str, str]] = []
    for category, acts in HARMFUL_ACTS.items():
        for act in acts:
            for template in rng.sample(PHRASINGS, PHRASINGS_PER_ACT):
                user = template.format(act=act)
                if category == "self_harm":
                    reply = rng.choice(SELF_HARM_REPLIES)
                else:
                    reply = " ".join((rng.choice(REFUSAL_OPENERS), rng.choice(REFUSAL_REASONS[category]),
                                      rng.choice(REFUSAL_ALTERNATIVES[category])))
                rows.append(("refusal", category, _system(rng), user, reply))
    for user, reply in HELPFUL:
        rows.append(("helpful", "benign", _system(rng), user, reply))
    rng.shuffle(rows)
    return [_record(i, *row) for i, row in enumerate(rows)]


def render(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


__all__ = ["FILE", "HARMFUL_ACTS", "HELPFUL", "SMOLLM_DEFAULT_SYSTEM", "generate", "render"]
