"""PII detection quality of pii-scrub: precision, recall and F1 per entity type.

Two labeled sets, both generated deterministically (Faker 40.54.0, fixed seeds; no network):

- ``pii``: chat messages with planted PII in many surface forms. Every planted value is a
  labeled span (start, end, type): PERSON (names from ~25 Latin-script Faker locales, full,
  first-only, title + surname, sign-offs, sentence-initial after a verb, possessives),
  EMAIL_ADDRESS, PHONE_NUMBER (Faker's national and international formats of 15 regions plus
  US numbers that are well formed but not valid in the numbering plan), CREDIT_CARD (7 brands,
  plain/grouped/dashed), US_SSN (dashed, spaced, plain after a context word), IP_ADDRESS
  (v4/v6, in URLs and with ports), IBAN_CODE (12 countries, compact and grouped),
  STREET_ADDRESS (US/GB/CA/AU street lines) and SECRET (cloud/API keys, tokens, private keys,
  passwords in URLs and connection strings).
- ``tech``: realistic technical conversations (user question + assistant answer, several
  turns) with code in 10 languages, stack traces, product/company/place names and public
  figures. Nothing in them is PII except a few planted, labeled values; every other detection
  is a false positive. The headline number is false PERSON spans per 10,000 words.

Scoring (per entity type): a labeled span is *caught* (TP) when detections of the same type
cover every alphanumeric character of it, else it is a miss (FN). A detection (after the
scrubber's own filters, overlapping detections of one type merged) that overlaps no labeled
span of its type is a false positive (FP). Precision = matched detections / detections.

    python benchmarks/pii_quality.py --label after          # writes benchmarks/results/pii_quality.json
    python benchmarks/pii_quality.py --label before --show-misses 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import string
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pii_quality.json"
SEED = 20261130

NAME_LOCALES = ["en_US", "en_GB", "en_IE", "en_IN", "en_NG", "en_KE", "de_DE", "fr_FR", "es_ES",
                "es_MX", "it_IT", "pt_BR", "nl_NL", "pl_PL", "sv_SE", "tr_TR", "cs_CZ", "ro_RO",
                "fi_FI", "da_DK", "hu_HU", "id_ID", "vi_VN", "yo_NG", "sw"]
PHONE_LOCALES = ["en_US", "en_GB", "en_CA", "en_AU", "en_IN", "de_DE", "fr_FR", "es_ES", "it_IT",
                 "nl_NL", "pl_PL", "pt_BR", "sv_SE", "ja_JP", "en_NZ"]
IBAN_LOCALES = ["de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "en_GB", "pl_PL", "pt_PT", "fi_FI",
                "de_AT", "de_CH", "no_NO"]
ADDRESS_LOCALES = ["en_US", "en_US", "en_US", "en_CA", "en_AU", "en_GB"]

# --------------------------------------------------------------------------------------------
# Labeled text assembly


class Doc:
    """A text built piece by piece; ``span`` pieces are recorded as labeled (start, end, type)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.labels: list[tuple[int, int, str]] = []
        self.pos = 0

    def add(self, text: str) -> "Doc":
        self.parts.append(text)
        self.pos += len(text)
        return self

    def span(self, text: str, etype: str) -> "Doc":
        self.labels.append((self.pos, self.pos + len(text), etype))
        return self.add(text)

    def fill(self, template: str, values: dict[str, tuple[str, str | None]]) -> "Doc":
        """``template`` with {slot}s; each value is (text, entity type or None for unlabeled)."""
        for piece in re.split(r"(\{\w+\})", template):
            m = re.fullmatch(r"\{(\w+)\}", piece)
            if m:
                text, etype = values[m.group(1)]
                self.span(text, etype) if etype else self.add(text)
            else:
                self.add(piece)
        return self

    @property
    def text(self) -> str:
        return "".join(self.parts)


# --------------------------------------------------------------------------------------------
# PII values in many surface forms


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _group(s: str, n: int, sep: str = " ") -> str:
    return sep.join(s[i:i + n] for i in range(0, len(s), n))


class Values:
    def __init__(self, seed: int = SEED) -> None:
        from faker import Faker

        self.rng = random.Random(seed)
        self.fakers: dict[str, Faker] = {}
        self.seed = seed

    def faker(self, locale: str):
        from faker import Faker

        if locale not in self.fakers:
            f = Faker(locale)
            f.seed_instance(self.seed + len(self.fakers))
            self.fakers[locale] = f
        return self.fakers[locale]

    # PERSON ------------------------------------------------------------------------------
    def person(self) -> tuple[str, str, str]:
        """(full name, first name, last name) of a random Latin-script locale."""
        for _ in range(50):
            f = self.faker(self.rng.choice(NAME_LOCALES))
            first, last = f.first_name(), f.last_name()
            if all(ch.isalpha() or ch in " '-" for ch in first + last) and first != last:
                return f"{first} {last}", first, last
        raise RuntimeError("no name")

    # EMAIL -------------------------------------------------------------------------------
    def email(self) -> str:
        f = self.faker(self.rng.choice(["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "pt_BR"]))
        kind = self.rng.randrange(6)
        if kind == 0:
            return f.free_email()
        if kind == 1:
            return f.company_email()
        if kind == 2:
            user = f.user_name()
            return f"{user}+{self.rng.choice(['orders', 'news', 'github', 'x1'])}@{f.free_email_domain()}"
        if kind == 3:
            return f"{f.first_name().lower()}.{f.last_name().lower()}@{f.domain_word()}.co.uk".replace(" ", "")
        if kind == 4:
            return f.email().upper() if self.rng.random() < 0.3 else f.email()
        return f"{f.user_name()}@mail.{f.domain_name()}"

    # PHONE -------------------------------------------------------------------------------
    def phone(self) -> str:
        kind = self.rng.randrange(10)
        if kind < 6:
            for _ in range(50):
                value = self.faker(self.rng.choice(PHONE_LOCALES)).phone_number()
                if "x" not in value.lower() and "ext" not in value.lower():
                    return value
        # US numbers well formed but not valid in the NANP (area/exchange codes 0xx/1xx, or
        # unassigned area codes such as 433): Presidio's recognizer drops these.
        area = self.rng.choice([f"{self.rng.randrange(200, 1000)}", "433", "255", "099", "123"])
        exch, line = f"{self.rng.randrange(100, 1000)}", f"{self.rng.randrange(0, 10000):04d}"
        fmt = self.rng.choice(["({a}) {e}-{l}", "+1 {a} {e} {l}", "{a}-{e}-{l}", "{a}.{e}.{l}",
                               "+1-{a}-{e}-{l}", "1 ({a}) {e}-{l}", "+1 ({a}) {e}-{l}", "{a} {e} {l}",
                               "({a}){e}-{l}", "+1{a}{e}{l}"])
        return fmt.format(a=area, e=exch, l=line)

    # CREDIT_CARD -------------------------------------------------------------------------
    def card(self) -> str:
        f = self.faker("en_US")
        brand = self.rng.choice(["visa", "visa16", "mastercard", "amex", "discover", "diners", "jcb"])
        number = f.credit_card_number(brand)
        style = self.rng.randrange(3)
        if style == 0 or len(number) not in (15, 16):
            return number
        if len(number) == 15:  # Amex 4-6-5
            sep = " " if style == 1 else "-"
            return f"{number[:4]}{sep}{number[4:10]}{sep}{number[10:]}"
        return _group(number, 4, " " if style == 1 else "-")

    # US_SSN ------------------------------------------------------------------------------
    def ssn(self) -> tuple[str, bool]:
        """(ssn text, needs a context word) - plain 9 digits only count after 'SSN'."""
        value = self.faker("en_US").ssn()
        style = self.rng.randrange(4)
        if style == 0:
            return value.replace("-", " "), False
        if style == 1:
            return value.replace("-", ""), True
        return value, False

    # IP ----------------------------------------------------------------------------------
    def ip(self) -> str:
        f = self.faker("en_US")
        kind = self.rng.randrange(5)
        if kind == 0:
            return f.ipv4_private()
        if kind == 1:
            return f.ipv4_public()
        if kind == 2:
            return f.ipv6()
        if kind == 3:  # compressed v6
            groups = [f"{self.rng.randrange(0, 65536):x}" for _ in range(3)]
            return f"2001:db8:{groups[0]}::{groups[1]}:{groups[2]}"
        return f.ipv4()

    # IBAN --------------------------------------------------------------------------------
    def iban(self) -> str:
        value = self.faker(self.rng.choice(IBAN_LOCALES)).iban()
        return _group(value, 4) if self.rng.random() < 0.5 else value

    # STREET_ADDRESS ----------------------------------------------------------------------
    def address(self) -> str:
        f = self.faker(self.rng.choice(ADDRESS_LOCALES))
        for _ in range(50):
            value = f.street_address().replace("\n", ", ")
            if value[0].isdigit():
                return value
        return value

    # SECRET ------------------------------------------------------------------------------
    def secret(self) -> tuple[str, str, str]:
        """(prefix text, secret value, suffix text); only the value is labeled."""
        rng = self.rng
        alnum = string.ascii_letters + string.digits
        kind = rng.randrange(12)
        if kind == 0:
            return "AWS_ACCESS_KEY_ID=", "AKIA" + _rand(rng, string.ascii_uppercase + "234567", 16), ""
        if kind == 1:
            return "aws_secret_access_key = ", _rand(rng, alnum + "/+", 40), ""
        if kind == 2:
            return "GITHUB_TOKEN=", "ghp_" + _rand(rng, alnum, 36), ""
        if kind == 3:
            return "slack bot token: ", f"xoxb-{rng.randrange(10**11, 10**12)}-{rng.randrange(10**12, 10**13)}-" + _rand(rng, alnum, 24), ""
        if kind == 4:
            return "stripe.api_key = \"", "sk_live_" + _rand(rng, alnum, 24), "\""
        if kind == 5:
            return "OPENAI_API_KEY=", "sk-" + _rand(rng, alnum, 48), ""
        if kind == 6:
            user = self.faker("en_US").user_name()
            pw = _rand(rng, alnum + "!$%", 14)
            host = self.faker("en_US").domain_name()
            scheme = rng.choice(["postgres", "mysql", "mongodb+srv", "redis", "amqp", "https"])
            return f"{scheme}://{user}:", pw, f"@{host}:5432/app"
        if kind == 7:
            pw = _rand(rng, alnum + "!#", 16)
            return "Server=db01;Database=shop;User Id=app;Password=", pw, ";"
        if kind == 8:
            return "DB_PASSWORD=", _rand(rng, alnum + "!@#", 18), ""
        if kind == 9:
            body = "\n".join(_rand(rng, alnum + "+/", 64) for _ in range(rng.randrange(3, 7)))
            return "", f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----", ""
        if kind == 10:
            def b64(n: int) -> str:
                return _rand(rng, alnum + "-_", n)
            return "Authorization: Bearer ", f"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.{b64(60)}.{b64(43)}", ""
        return "google maps key: ", "AIza" + _rand(rng, alnum + "-_", 35), ""


# --------------------------------------------------------------------------------------------
# The labeled PII set

PERSON_TEMPLATES = [
    "Call {full} at the front desk tomorrow, she knows about the refund.",
    "Ask {full} from accounting to resend the invoice.",
    "{full} reported the outage first, then the whole team noticed.",
    "Hi, my name is {full} and I cannot log in since yesterday.",
    "I spoke with {full} on the phone last week about this order.",
    "This is {full}. The replacement unit also arrived broken.",
    "Please forward this to {full}, who handles our account now.",
    "Thanks for the quick help!\n\nBest regards,\n{full}",
    "Thanks,\n{first}",
    "Hi {first}, thanks for getting back to me so quickly.",
    "Dear {first},\n\nthe package still has not arrived.",
    "Mr. {last} said the technician would come on Monday.",
    "Dr. {last} needs the lab results before Friday.",
    "Please tell Ms. {last} that the contract is signed.",
    "My colleague {full} will pick up the laptop.",
    "We met {full} at the conference and she recommended your service.",
    "The account is registered to {full}, not to me.",
    "{first} and I both use the same login, is that a problem?",
    "Cheers, {full}",
    "Email {full} the signed form when you get a chance.",
    "Remind {full} about the meeting at 3pm.",
    "{full}'s laptop was stolen, so please lock the account.",
    "I am writing on behalf of my mother, {full}.",
    "Contact person: {full}",
    "Invite {full} and {full2} to the review.",
]
CONTACT_TEMPLATES = {
    "EMAIL_ADDRESS": ["You can email me at {v} anytime.", "my email is {v}", "Send the invoice to {v}, please.",
                      "Contact: {v}", "Reply-To: {v}", "(cc {v})", "reach out to {v} for access"],
    "PHONE_NUMBER": ["Call me at {v} after 5pm.", "My number is {v}.", "Phone: {v}", "You can reach me on {v}",
                     "mobile {v}, WhatsApp works too", "Tel. {v}", "or text {v} if it is urgent",
                     "Please ring {v} tomorrow.", "{v} is my cell", "my new phone number: {v}"],
    "CREDIT_CARD": ["I paid with the card {v} and got charged twice.", "card number {v}, exp 04/27",
                    "Please refund to {v}.", "Visa: {v}", "The charge on {v} is not mine."],
    "IP_ADDRESS": ["The server at {v} stopped responding.", "my IP is {v}", "blocked requests from {v} in the firewall",
                   "ssh admin@{v} fails with a timeout", "curl http://{v}/health returns 502",
                   "it listens on {v}:8080"],
    "IBAN_CODE": ["Please transfer the refund to IBAN {v}.", "My bank account: {v}", "IBAN: {v}",
                  "wire it to {v} (same name as the order)"],
    "STREET_ADDRESS": ["Please ship it to {v} instead.", "I moved to {v} last month.", "Address: {v}",
                       "deliver to {v}, the side door", "My billing address is {v}."],
}
SSN_TEMPLATES = ["My SSN is {v}.", "social security number {v}", "SSN: {v}", "ssn {v} - please update my file"]
SSN_FORMATTED_TEMPLATES = ["My SSN is {v}.", "social security number {v}", "here it is: {v}",
                           "The form shows {v} as my number."]


def pii_set(n_per_type: int = 130, n_person: int = 260, seed: int = SEED) -> list[Doc]:
    vals = Values(seed)
    rng = vals.rng
    docs: list[Doc] = []
    for i in range(n_person):
        full, first, last = vals.person()
        full2 = vals.person()[0]
        t = PERSON_TEMPLATES[i % len(PERSON_TEMPLATES)]
        d = Doc()
        d.fill(t, {"full": (full, "PERSON"), "first": (first, "PERSON"), "last": (last, "PERSON"),
                   "full2": (full2, "PERSON")})
        docs.append(d)
    makers = {"EMAIL_ADDRESS": vals.email, "PHONE_NUMBER": vals.phone, "CREDIT_CARD": vals.card,
              "IP_ADDRESS": vals.ip, "IBAN_CODE": vals.iban, "STREET_ADDRESS": vals.address}
    for etype, make in makers.items():
        templates = CONTACT_TEMPLATES[etype]
        for i in range(n_per_type):
            d = Doc()
            if i % 3 == 0:  # a name and a lead-in around it, like a real message
                d.add(rng.choice(["Hello, ", "Hi team, ", "", "Quick question. ", "Update: "]))
            d.fill(templates[i % len(templates)], {"v": (make(), etype)})
            docs.append(d)
    for i in range(n_per_type):
        value, needs_context = vals.ssn()
        templates = SSN_TEMPLATES if needs_context else SSN_FORMATTED_TEMPLATES
        docs.append(Doc().fill(templates[i % len(templates)], {"v": (value, "US_SSN")}))
    for i in range(n_per_type):
        pre, value, post = vals.secret()
        d = Doc().add(rng.choice(["Here is my config:\n", "the .env has ", "", "I set ", "```\n"]))
        d.add(pre).span(value, "SECRET").add(post)
        docs.append(d)
    # Mixed messages: several types in one message.
    for i in range(40):
        full, first, _ = vals.person()
        d = Doc().add("Hi, I'm ").span(full, "PERSON").add(". Please update my details: phone ")
        d.span(vals.phone(), "PHONE_NUMBER").add(", email ").span(vals.email(), "EMAIL_ADDRESS")
        d.add(", new address ").span(vals.address(), "STREET_ADDRESS").add(".\nThanks, ").span(first, "PERSON")
        docs.append(d)
    return docs


# --------------------------------------------------------------------------------------------
# The technical set: nothing is PII except planted, labeled values

PRODUCTS = ["Java", "Kotlin", "Python", "TypeScript", "React", "Angular", "Vue", "Svelte", "Next.js",
            "PostgreSQL", "MySQL", "Redis", "MongoDB", "Elasticsearch", "Kafka", "RabbitMQ",
            "Kubernetes", "Docker", "Terraform", "Ansible", "Jenkins", "GitHub Actions", "GitLab CI",
            "Visual Studio Code", "IntelliJ IDEA", "PyCharm", "Xcode", "Android Studio", "Jupyter",
            "TensorFlow", "PyTorch", "Pandas", "NumPy", "scikit-learn", "Django", "Flask", "FastAPI",
            "Spring Boot", "Ruby on Rails", "Laravel", "Express", "Nginx", "Apache Tomcat", "Ubuntu",
            "Debian", "Windows 11", "macOS Sonoma", "Raspberry Pi", "Arduino", "Unity", "Unreal Engine",
            "Blender", "Photoshop", "Excel", "Power BI", "Tableau", "Salesforce", "Shopify", "Stripe",
            "Twilio", "Heroku", "Vercel", "Netlify", "Firebase", "Supabase", "AWS Lambda", "Amazon S3",
            "Azure Functions", "Google Cloud Run", "BigQuery", "Snowflake", "Airflow", "Spark",
            "Hadoop", "Grafana", "Prometheus", "Datadog", "Sentry", "Jira", "Confluence", "Slack",
            "Discord", "Zoom", "Figma", "Notion", "WordPress", "Minecraft", "Godot", "Rust", "Go",
            "Swift", "Flutter", "Electron", "Webpack", "Vite", "Babel", "ESLint", "Prettier",
            "Hugging Face Transformers", "LangChain", "ChatGPT", "Copilot", "Selenium", "Playwright",
            "Cypress", "Postman", "Homebrew", "Chocolatey", "Conda", "Poetry", "Gradle", "Maven"]
COMPANIES = ["Google", "Microsoft", "Amazon", "Oracle", "IBM", "Nvidia", "Intel", "AMD", "Samsung",
             "Tesla", "Netflix", "Uber", "Airbnb", "Spotify", "Atlassian", "Adobe", "Cisco",
             "Red Hat", "Canonical", "Mozilla", "JetBrains", "Cloudflare", "DigitalOcean", "Meta",
             "Apple", "OpenAI", "Anthropic", "Stack Overflow", "GitHub", "Dropbox", "Siemens",
             "SAP", "Accenture", "Infosys", "Deloitte", "Goldman Sachs", "Walmart", "Zalando"]
PLACES = ["Berlin", "San Francisco", "Tokyo", "Bangalore", "London", "Paris", "Toronto", "Sydney",
          "São Paulo", "Austin", "Seattle", "Dublin", "Singapore", "Mumbai", "Nairobi", "Lagos",
          "Amsterdam", "Stockholm", "Warsaw", "Lisbon", "Madrid", "Zurich", "Boston", "Chicago",
          "New York", "Vancouver", "Melbourne", "Cape Town", "Seoul", "Shenzhen", "Tel Aviv",
          "the Bay Area", "Silicon Valley", "Europe", "us-east-1", "eu-west-2", "Frankfurt"]
PUBLIC_FIGURES = ["Linus Torvalds", "Guido van Rossum", "Ada Lovelace", "Alan Turing", "Grace Hopper",
                  "Dennis Ritchie", "Bjarne Stroustrup", "James Gosling", "Brendan Eich",
                  "Tim Berners-Lee", "Donald Knuth", "Edsger Dijkstra", "Elon Musk", "Bill Gates",
                  "Steve Jobs", "Satya Nadella", "Sundar Pichai", "Jeff Bezos", "Mark Zuckerberg",
                  "Barack Obama", "Albert Einstein", "Isaac Newton", "Marie Curie", "Yann LeCun",
                  "Geoffrey Hinton", "Andrew Ng", "Andrej Karpathy", "Sam Altman", "Martin Fowler",
                  "Kent Beck", "Rob Pike", "Ken Thompson", "John Carmack", "Margaret Hamilton",
                  "Claude Shannon", "John von Neumann", "Richard Stallman", "Steve Wozniak",
                  "Jensen Huang", "Lisa Su", "Taylor Swift", "William Shakespeare", "Leonardo da Vinci"]
GAME_WORDS = ["Mage, Warrior, Bowman", "Paladin", "Necromancer", "Dragonborn", "the Lich King",
              "Hello World", "Lorem Ipsum", "Foo Bar"]
IDIOMS = ["Lo and behold, it worked after the restart.", "Long story short, the cache was stale.",
          "Fun fact: the default is different on Windows.", "Bottom line: pin your versions.",
          "Spoiler: it was DNS.", "Rule of thumb: measure before you optimise."]

CODE = {
    "python": [
        '''import pandas as pd

def load_orders(path: str) -> pd.DataFrame:
    df = pd.read_csv(path, parse_dates=["created_at"])
    df["total"] = df["quantity"] * df["unit_price"]
    return df[df["status"] != "Cancelled"]''',
        '''class UserService:
    def __init__(self, repo, mailer):
        self.repo = repo
        self.mailer = mailer

    def register(self, name, email):
        user = self.repo.create(name=name, email=email)
        self.mailer.send_welcome(user)
        return user''',
        '''@app.route("/api/items/<int:item_id>")
def get_item(item_id):
    item = Item.query.get_or_404(item_id)
    return jsonify(id=item.id, title=item.title, price=float(item.price))''',
        '''for epoch in range(num_epochs):
    model.train()
    for batch in DataLoader(train_ds, batch_size=32, shuffle=True):
        optimizer.zero_grad()
        loss = criterion(model(batch["x"]), batch["y"])
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch}: loss={loss.item():.4f}")''',
    ],
    "javascript": [
        '''const express = require("express");
const app = express();
app.get("/users/:id", async (req, res) => {
  const user = await User.findById(req.params.id);
  if (!user) return res.status(404).json({ error: "Not Found" });
  res.json({ id: user.id, displayName: user.displayName });
});
app.listen(3000);''',
        '''useEffect(() => {
  fetch(`/api/orders?page=${page}`)
    .then((r) => r.json())
    .then((data) => setOrders(data.items))
    .catch((err) => console.error("Failed to load orders", err));
}, [page]);''',
    ],
    "typescript": [
        '''interface Invoice {
  id: string;
  customerName: string;
  amount: number;
  dueDate: Date;
}

export function isOverdue(inv: Invoice, today = new Date()): boolean {
  return inv.dueDate.getTime() < today.getTime();
}''',
    ],
    "java": [
        '''@RestController
@RequestMapping("/api/accounts")
public class AccountController {
    private final AccountService accountService;

    public AccountController(AccountService accountService) {
        this.accountService = accountService;
    }

    @GetMapping("/{id}")
    public ResponseEntity<AccountDto> get(@PathVariable Long id) {
        return ResponseEntity.ok(accountService.findById(id));
    }
}''',
        '''List<String> names = employees.stream()
    .filter(e -> e.getDepartment().equals("Engineering"))
    .map(Employee::getFullName)
    .sorted()
    .collect(Collectors.toList());''',
    ],
    "go": [
        '''func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if err := s.db.PingContext(ctx); err != nil {
		http.Error(w, "database unavailable", http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusOK)
}''',
    ],
    "rust": [
        '''#[derive(Debug, Deserialize)]
struct Config {
    listen_addr: String,
    max_connections: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg: Config = toml::from_str(&std::fs::read_to_string("config.toml")?)?;
    println!("listening on {}", cfg.listen_addr);
    Ok(())
}''',
    ],
    "cpp": [
        '''#include <vector>
#include <algorithm>

template <typename T>
T median(std::vector<T> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}''',
    ],
    "csharp": [
        '''public async Task<IActionResult> Index()
{
    var products = await _context.Products
        .Where(p => p.IsActive)
        .OrderBy(p => p.Name)
        .ToListAsync();
    return View(products);
}''',
    ],
    "sql": [
        '''SELECT c.customer_name, COUNT(o.id) AS orders, SUM(o.total) AS revenue
FROM customers c
JOIN orders o ON o.customer_id = c.id
WHERE o.created_at >= DATE '2024-01-01'
GROUP BY c.customer_name
ORDER BY revenue DESC
LIMIT 10;''',
    ],
    "bash": [
        '''#!/usr/bin/env bash
set -euo pipefail
docker build -t myapp:latest .
docker run -d --name myapp -p 8080:8080 -e LOG_LEVEL=debug myapp:latest
kubectl rollout status deployment/myapp --timeout=120s''',
    ],
    "yaml": [
        '''name: CI
on: [push, pull_request]
jobs:
  test:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with:
          python-version: "3.11"
      - run: pip install -r requirements.txt && pytest -q''',
    ],
}
TRACES = [
    '''Traceback (most recent call last):
  File "/home/app/src/main.py", line 42, in <module>
    main()
  File "/home/app/src/main.py", line 37, in main
    df = load_orders(args.input)
  File "/home/app/src/orders.py", line 12, in load_orders
    df["total"] = df["quantity"] * df["unit_price"]
KeyError: 'unit_price\'''',
    '''Exception in thread "main" java.lang.NullPointerException: Cannot invoke "String.length()" because "name" is null
    at com.example.billing.InvoiceService.format(InvoiceService.java:88)
    at com.example.billing.InvoiceController.show(InvoiceController.java:41)
    at java.base/java.lang.Thread.run(Thread.java:833)''',
    '''TypeError: Cannot read properties of undefined (reading 'map')
    at OrderList (webpack-internal:///./src/components/OrderList.jsx:23:18)
    at renderWithHooks (react-dom.development.js:16305:18)
    at mountIndeterminateComponent (react-dom.development.js:20074:13)''',
    '''panic: runtime error: invalid memory address or nil pointer dereference
[signal SIGSEGV: segmentation violation code=0x1 addr=0x0 pc=0x4a3b2c]

goroutine 1 [running]:
main.(*Server).handleHealth(0x0, {0x7f2c40, 0xc000132000}, 0xc000146000)
	/app/server.go:57 +0x2c''',
    '''error[E0502]: cannot borrow `items` as mutable because it is also borrowed as immutable
  --> src/main.rs:14:5
   |
12 |     let first = &items[0];
   |                  ----- immutable borrow occurs here
13 |
14 |     items.push(4);
   |     ^^^^^^^^^^^^^ mutable borrow occurs here''',
    '''psycopg2.OperationalError: connection to server at "localhost" (127.0.0.1), port 5432 failed: Connection refused
	Is the server running on that host and accepting TCP/IP connections?''',
    '''npm ERR! code ERESOLVE
npm ERR! ERESOLVE unable to resolve dependency tree
npm ERR! Found: react@18.2.0
npm ERR! Could not resolve dependency:
npm ERR! peer react@"^17.0.0" from react-beautiful-dnd@13.1.1''',
]
USER_OPENERS = [
    "I'm getting this error when I run my {lang} code with {product}:",
    "How do I fix this? We deploy on {product} in {place}.",
    "Can you review this {lang} snippet? Our team at {company} uses {product}.",
    "My {product} build broke after upgrading. Here is the code:",
    "Why does this {lang} function return the wrong result?",
    "{product} keeps crashing on {product2}. Log below.",
    "We are migrating from {product} to {product2}. Is this approach OK?",
    "I watched a talk by {figure} about {product} and tried this:",
    "In my game the classes are {game}. How should I model them in {lang}?",
    "Our {company} account manager suggested {product}, but I'm not sure. Thoughts?",
]
ASSISTANT_OPENERS = [
    "The problem is in how {product} handles the request. Change the function like this:",
    "Good question. {idiom} Here is a cleaner version:",
    "This error means the value is missing. In {lang} you can guard against it:",
    "{product} expects a different configuration. Try this instead:",
    "As {figure} put it, simple is better than clever. A simpler version:",
    "You can do this with {product2}; the {company} docs show a similar pattern:",
    "Sure! Here is an example that works with {product} on {place} servers:",
]
ASSISTANT_CLOSERS = [
    "After that, restart the service and the error should be gone.",
    "Let me know if {product} still complains and paste the new stack trace.",
    "If you deploy to {place}, also check the region settings in {product2}.",
    "This is also what the {company} engineering blog recommends.",
    "Note that `{ident}` must be defined before you call it.",
    "Run the tests again; `pytest -q` should now pass.",
    "{idiom}",
]
IDENTS = ["getUserName", "order_total", "AccountService", "handleSubmit", "MAX_RETRIES", "self.repo",
          "fetchOrders()", "InvoiceController", "useEffect", "Vec<String>", "df.groupby", "main.rs"]


def _fmt(rng: random.Random, template: str, lang: str) -> str:
    return template.format(
        lang=lang.capitalize() if lang not in ("cpp", "csharp", "sql", "yaml") else
        {"cpp": "C++", "csharp": "C#", "sql": "SQL", "yaml": "YAML"}[lang],
        product=rng.choice(PRODUCTS), product2=rng.choice(PRODUCTS), company=rng.choice(COMPANIES),
        place=rng.choice(PLACES), figure=rng.choice(PUBLIC_FIGURES), game=rng.choice(GAME_WORDS),
        idiom=rng.choice(IDIOMS), ident=rng.choice(IDENTS))


def tech_set(n: int = 220, seed: int = SEED + 1) -> list[list[Doc]]:
    """n conversations (lists of message Docs). ~1 in 10 carries a planted, labeled PII value."""
    vals = Values(seed)
    rng = vals.rng
    convs = []
    for i in range(n):
        lang = rng.choice(sorted(CODE))
        turns = []
        for t in range(rng.choice([1, 1, 2, 3])):
            u = Doc().add(_fmt(rng, rng.choice(USER_OPENERS), lang) + "\n\n")
            if rng.random() < 0.5:
                u.add("```\n" + rng.choice(TRACES) + "\n```\n")
            else:
                u.add(f"```{lang}\n" + rng.choice(CODE[lang]) + "\n```\n")
            if i % 10 == 3 and t == 0:  # a planted value in a technical message
                kind = rng.randrange(3)
                if kind == 0:
                    u.add("\nIf you need access, my work email is ").span(vals.email(), "EMAIL_ADDRESS").add(".")
                elif kind == 1:
                    pre, value, post = vals.secret()
                    u.add("\nThe failing config line:\n```\n" + pre).span(value, "SECRET").add(post + "\n```")
                else:
                    u.add("\nThe box is reachable at ").span(vals.faker("en_US").ipv4_public(), "IP_ADDRESS").add(".")
            a = Doc().add(_fmt(rng, rng.choice(ASSISTANT_OPENERS), lang) + "\n\n")
            a.add(f"```{lang}\n" + rng.choice(CODE[lang]) + "\n```\n\n")
            a.add(_fmt(rng, rng.choice(ASSISTANT_CLOSERS), lang))
            if rng.random() < 0.3:
                a.add(f" You may also want to look at {rng.choice(PRODUCTS)} or {rng.choice(PRODUCTS)}, "
                      f"which {rng.choice(COMPANIES)} maintains.")
            turns += [u, a]
        convs.append(turns)
    return convs


# --------------------------------------------------------------------------------------------
# Detection through the pipeline's own scrubber, and scoring


def load_scrubber():
    import yaml

    from llmpipe.data import pii

    section = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["pii"]
    if hasattr(pii, "PiiConfig"):  # the code before the typed config (the "before" run)
        return pii.PiiScrubber(pii.PiiConfig.from_params(section))
    from llmpipe.config.data import PiiSection

    return pii.PiiScrubber(PiiSection.model_validate(section))


def detect(scrubber, texts: list[str]) -> list[list[tuple[int, int, str]]]:
    """Detections the scrubber would replace, per text, as (start, end, type)."""
    if hasattr(scrubber, "detect"):
        return scrubber.detect(texts)
    out = []  # before the detect() API: the analyzer results after the scrubber's own filters
    for text, results in zip(texts, scrubber.analyze_texts(texts)):
        kept, _ = scrubber._filter(text, results)
        out.append([(r.start, r.end, r.entity_type) for r in kept])
    return out


def _merge(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    merged: list[list] = []
    for s, e, t in sorted(spans, key=lambda x: (x[2], x[0], x[1])):
        if merged and merged[-1][2] == t and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e, t])
    return [tuple(m) for m in merged]


def score(text: str, gold: list[tuple[int, int, str]], pred: list[tuple[int, int, str]], acc: dict,
          misses: list, false_pos: list) -> None:
    pred = _merge(pred)
    for s, e, t in gold:
        covered = set()
        for ps, pe, pt in pred:
            if pt == t:
                covered.update(range(max(s, ps), min(e, pe)))
        need = {i for i in range(s, e) if text[i].isalnum()}
        acc[t]["gold"] += 1
        if need <= covered:
            acc[t]["tp"] += 1
        else:
            misses.append({"type": t, "value": text[s:e], "context": text[max(0, s - 40):e + 40]})
    for ps, pe, pt in pred:
        acc[pt]["pred"] += 1
        if any(t == pt and ps < e and s < pe for s, e, t in gold):
            acc[pt]["pred_matched"] += 1
        else:
            false_pos.append({"type": pt, "value": text[ps:pe], "context": text[max(0, ps - 40):pe + 40]})


def summarise(acc: dict) -> dict:
    out = {}
    for t in sorted(acc):
        a = acc[t]
        r = a["tp"] / a["gold"] if a["gold"] else None
        p = a["pred_matched"] / a["pred"] if a["pred"] else None
        f1 = 2 * p * r / (p + r) if p and r else (0.0 if a["gold"] else None)
        out[t] = {"labeled": a["gold"], "caught": a["tp"], "detections": a["pred"],
                  "false_positives": a["pred"] - a["pred_matched"],
                  "precision": None if p is None else round(p, 4),
                  "recall": None if r is None else round(r, 4), "f1": None if f1 is None else round(f1, 4)}
    return out


def evaluate(scrubber=None, show: int = 0) -> dict:
    scrubber = scrubber or load_scrubber()
    pii_docs = pii_set()
    convs = tech_set()
    tech_docs = [d for c in convs for d in c]
    res: dict = {}
    for name, docs in (("pii", pii_docs), ("tech", tech_docs)):
        texts = [d.text for d in docs]
        t0 = time.perf_counter()
        preds = detect(scrubber, texts)
        seconds = time.perf_counter() - t0
        acc: dict = defaultdict(Counter)
        misses, false_pos = [], []
        for d, text, pred in zip(docs, texts, preds):
            score(text, d.labels, pred, acc, misses, false_pos)
        words = sum(len(t.split()) for t in texts)
        fp_by_type = Counter(f["type"] for f in false_pos)
        res[name] = {
            "texts": len(texts), "words": words, "labeled_spans": sum(len(d.labels) for d in docs),
            "per_type": summarise(acc),
            "false_positives_by_type": dict(sorted(fp_by_type.items())),
            "false_person_per_10k_words": round(fp_by_type["PERSON"] * 10_000 / words, 2),
            "seconds": round(seconds, 2),
            "misses_sample": misses[:show], "false_positives_sample": false_pos[:show],
        }
        if name == "tech":
            res[name]["conversations"] = len(convs)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True, help="key under which the result is stored (before/after)")
    ap.add_argument("--show-misses", type=int, default=15, help="misses/false positives kept per set")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = evaluate(show=args.show_misses)
    for name in ("pii", "tech"):
        r = res[name]
        print(f"[{args.label}] {name}: {r['texts']} texts, {r['words']} words, {r['labeled_spans']} labeled spans, "
              f"false PERSON/10k words {r['false_person_per_10k_words']}", file=sys.stderr)
        for t, s in r["per_type"].items():
            print(f"   {t:15s} labeled {s['labeled']:5d} recall {s['recall']}  precision {s['precision']}  "
                  f"FP {s['false_positives']}", file=sys.stderr)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    from importlib import metadata

    data[args.label] = {"git_commit": os.popen(f"git -C {ROOT} rev-parse --short HEAD").read().strip(),
                        "faker": metadata.version("faker"), "seed": SEED, **res}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
