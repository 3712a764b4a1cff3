"""Generate peftkit's bundled sample dataset: customer-support Q&A for a made-up shop.

The shop
--------
*Fernhill Outfitters* is an invented outdoor-gear shop. It sells 25 products (tents,
packs, jackets, boots, sleeping bags, stoves, lights, ...), each with a price, a SKU of
the form ``FH-1042``, a warranty and one line of key specs, and it has nine store
policies: standard, express and international shipping, a 45-day returns window, a
14-day price-match rule, store hours, a support e-mail, warranty claims and a loyalty
club. All of these facts are made up, so the base model cannot know any of them.

The answer format
-----------------
Every assistant answer has exactly three lines::

    Fernhill Support:
    The Ridgeback 2P Tent costs $349.
    — Ref FH-1042 · fernhill.example/help

a fixed header, one or two short sentences with the fact, and a reference line that
carries the product's SKU (or a policy code such as ``FH-RETURNS``) and the help URL.

Why this data
-------------
``make demo`` fine-tunes SmolLM2-135M-Instruct with LoRA for only a few minutes on a
2-core CPU and then prints the base model's and the adapter's answers side by side for
the held-out prompts in ``eval.jsonl``. For the change to be visible after so short a
run, the target behaviour has to be (1) a format that is recognisable at a glance (the
header and the ``— Ref … · fernhill.example/help`` footer appear in every answer and
never in the base model's), (2) facts that are invented, so a correct price or SKU can
only come from the adapter, and (3) short: answers are under ~60 tokens and a whole
row under ~160 tokens with the SmolLM2 chat template, so each step is cheap.

Questions are built from templates x products x policies, with light greetings mixed
in, so the model learns the pattern rather than memorising strings. Some question
templates are used only for ``eval.jsonl`` (and two "we don't carry that" items only
appear there), so no eval question appears verbatim in ``train.jsonl``. About 13% of
the training rows are two-turn conversations (a follow-up such as "And how long is it
guaranteed?") and a handful carry a ``system`` message.

Usage::

    python examples/make_sample_data.py            # writes examples/data/{train,eval}.jsonl
    python examples/make_sample_data.py --out DIR  # writes DIR/{train,eval}.jsonl

The output is deterministic (``random.Random(0)``, standard library only): running the
script again reproduces byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HEADER = "Fernhill Support:"
HELP_URL = "fernhill.example/help"
SUPPORT_EMAIL = "help@fernhill.example"

# name, short alias used in some questions, price (USD), SKU, warranty, key specs
# (the specs continue the sentence "The <name> ...").
PRODUCTS = [
    ("Ridgeback 2P Tent", "Ridgeback 2P", 349, "FH-1042", "5-year warranty",
     "weighs 1.9 kg, sleeps two and has a 3,000 mm waterproof fly"),
    ("Ridgeback 4P Tent", "Ridgeback 4P", 489, "FH-1047", "5-year warranty",
     "weighs 3.4 kg, sleeps four and has two doors with vestibules"),
    ("Cinder Ultralight Tarp", "Cinder tarp", 129, "FH-1053", "2-year warranty",
     "weighs 410 g and pitches with two trekking poles"),
    ("Alder 30L Daypack", "Alder 30", 119, "FH-2011", "lifetime warranty",
     "holds 30 litres, weighs 980 g and has a padded laptop sleeve"),
    ("Alder 55L Trekking Pack", "Alder 55", 229, "FH-2018", "lifetime warranty",
     "holds 55 litres, has an adjustable back length and comes with a rain cover"),
    ("Wren 18L Running Vest", "Wren vest", 99, "FH-2024", "1-year warranty",
     "holds 18 litres and comes with two 500 ml soft flasks"),
    ("Summit Shell Jacket", "Summit shell", 279, "FH-3105", "3-year warranty",
     "is a 3-layer waterproof shell, weighs 390 g and has pit zips"),
    ("Larch Down Jacket", "Larch jacket", 249, "FH-3112", "3-year warranty",
     "has 800-fill down and packs into its own chest pocket"),
    ("Tarn Fleece Pullover", "Tarn fleece", 79, "FH-3120", "2-year warranty",
     "is made from recycled polyester fleece and has a kangaroo pocket"),
    ("Gale Rain Pants", "Gale pants", 119, "FH-3131", "3-year warranty",
     "are waterproof, weigh 280 g and have full-length side zips"),
    ("Scree Hiking Boot", "Scree boots", 189, "FH-4030", "2-year warranty",
     "weighs 1.3 kg a pair, is waterproof and has Vibram soles"),
    ("Brook Trail Runner", "Brook runners", 139, "FH-4036", "1-year warranty",
     "has a 6 mm drop, 5 mm lugs and a breathable mesh upper"),
    ("Heron Camp Sandal", "Heron sandals", 59, "FH-4041", "1-year warranty",
     "has quick-dry straps and a cushioned cork footbed"),
    ("Ember Down Sleeping Bag", "Ember bag", 299, "FH-5060", "5-year warranty",
     "is rated to -5 C, weighs 1.1 kg and is filled with 650-fill down"),
    ("Drift Synthetic Sleeping Bag", "Drift bag", 149, "FH-5066", "3-year warranty",
     "is rated to 2 C and stays warm even when damp"),
    ("Moss Insulated Sleeping Pad", "Moss pad", 139, "FH-5071", "3-year warranty",
     "has an R-value of 4.2, weighs 480 g and is 7 cm thick"),
    ("Flint Titanium Stove", "Flint stove", 89, "FH-6012", "lifetime warranty",
     "weighs 56 g and boils a litre of water in 3.5 minutes"),
    ("Kettle Ridge Cook Set", "Kettle Ridge set", 69, "FH-6019", "2-year warranty",
     "has a 1.2 litre pot, a lid that works as a pan and two nesting mugs"),
    ("Beacon 400 Headlamp", "Beacon 400", 49, "FH-7003", "2-year warranty",
     "gives 400 lumens, runs 60 hours on low and charges by USB-C"),
    ("Lumen Camp Lantern", "Lumen lantern", 39, "FH-7009", "1-year warranty",
     "gives 250 lumens and doubles as a power bank"),
    ("Spring Water Filter", "Spring filter", 45, "FH-7015", "1-year warranty",
     "filters 1,500 litres and removes 99.9% of bacteria"),
    ("Cairn Carbon Trekking Poles", "Cairn poles", 129, "FH-7022", "lifetime warranty",
     "are carbon fibre, weigh 410 g a pair and fold to 38 cm"),
    ("Vale Insulated Bottle", "Vale bottle", 35, "FH-7030", "lifetime warranty",
     "holds 750 ml and keeps drinks cold for 24 hours"),
    ("Pike Camp Chair", "Pike chair", 85, "FH-8004", "2-year warranty",
     "weighs 950 g and holds up to 130 kg"),
    ("Rook Hammock", "Rook hammock", 65, "FH-8011", "1-year warranty",
     "holds up to 180 kg and comes with tree straps"),
]

# The middle line of a product answer, per question intent.
# {costs}/{has}/{comes}/{it} agree with the name ("The Gale Rain Pants cost ...").
PRODUCT_ANSWERS = {
    "price": "The {name} {costs} ${price}.",
    "sku": "The {name} {has} the SKU {sku}.",
    "warranty": "The {name} {comes} with a {warranty}.",
    "specs": "The {name} {specs}.",
    "overview": "The {name} {costs} ${price}. {it} {specs}.",
}

# Question templates per product intent: ({p} is the product's name or alias).
# "train" templates are only used in train.jsonl, "eval" ones only in eval.jsonl.
PRODUCT_QUESTIONS = {
    "price": {
        "train": [
            "How much is the {p}?",
            "What does the {p} cost?",
            "What's the price of the {p}?",
            "How much do you charge for the {p}?",
            "Price for the {p}, please.",
            "I'm thinking of buying the {p}. How much is it?",
            "Can you tell me what the {p} sells for?",
            "what is the {p} price",
            "How expensive is the {p}?",
            "What's the current price on the {p}?",
        ],
        "eval": [
            "What would the {p} set me back?",
            "Could you give me a price on the {p}?",
        ],
    },
    "sku": {
        "train": [
            "What's the SKU for the {p}?",
            "What is the item number of the {p}?",
            "Which product code does the {p} have?",
            "I need the SKU of the {p} for my order form.",
            "sku for the {p}?",
            "What's the part number for the {p}?",
            "Can you give me the product number for the {p}?",
            "What item code is the {p}?",
            "What's the catalogue number of the {p}?",
            "Tell me the {p}'s SKU.",
        ],
        "eval": [
            "Which code should I quote when ordering the {p}?",
            "What reference number is the {p} listed under?",
        ],
    },
    "warranty": {
        "train": [
            "What warranty does the {p} have?",
            "How long is the {p} guaranteed for?",
            "Is the {p} covered by a warranty?",
            "What's the warranty on the {p}?",
            "How many years of warranty come with the {p}?",
            "If the {p} breaks, am I covered?",
            "warranty on the {p}?",
            "Does the {p} come with a guarantee?",
            "What kind of coverage do I get with the {p}?",
            "How long does the warranty on the {p} last?",
        ],
        "eval": [
            "For how long do you stand behind the {p}?",
            "If my {p} turns out faulty, how long am I protected?",
        ],
    },
    "specs": {
        "train": [
            "What are the specs of the {p}?",
            "Tell me the key specs of the {p}.",
            "What are the main features of the {p}?",
            "Can you give me the technical details for the {p}?",
            "specs for the {p}?",
            "What are the specifications of the {p}?",
            "How is the {p} built?",
            "What are the {p}'s key features?",
            "Give me the spec sheet highlights for the {p}.",
            "Describe the features of the {p}.",
        ],
        "eval": [
            "What makes the {p} stand out on paper?",
            "Could you run me through the {p}'s numbers?",
        ],
    },
    "overview": {
        "train": [
            "Tell me about the {p}.",
            "Can you give me a quick overview of the {p}?",
            "What is the {p} like?",
            "I'm interested in the {p}. What can you tell me?",
            "Give me a rundown of the {p}.",
            "Is the {p} any good? Tell me about it.",
            "What do I get with the {p}?",
            "Summarise the {p} for me.",
            "Could you describe the {p}?",
            "What's the {p} all about?",
        ],
        "eval": [
            "I've never heard of the {p} - what is it?",
            "Pitch me the {p} in one sentence.",
        ],
    },
}

# Second-turn questions about the product of the first turn.
FOLLOW_UPS = {
    "price": {
        "train": ["And how much is it?", "What does it cost?", "Nice. What's the price?"],
        "eval": ["OK, and what's the damage on that one?"],
    },
    "sku": {
        "train": ["What's its SKU?", "And the item number?", "Which product code is it?"],
        "eval": ["Which code is it listed under?"],
    },
    "warranty": {
        "train": ["Does it have a warranty?", "And how long is it guaranteed?", "What warranty comes with it?"],
        "eval": ["How long are you covering it for?"],
    },
    "specs": {
        "train": ["What are its specs?", "And the key features?", "Tell me more about its specs."],
        "eval": ["What are its numbers like?"],
    },
}

# code, answer, question templates
POLICIES = {
    "ship_standard": (
        "FH-SHIP",
        "Standard shipping takes 3-5 business days and costs $6.95; it's free on orders over $75.",
        {
            "train": [
                "How much is shipping?",
                "How long does standard shipping take?",
                "What are your shipping costs?",
                "Do you offer free shipping?",
                "When will my order arrive with regular shipping?",
                "How much is delivery?",
                "What's the delivery time for a normal order?",
                "Is shipping free over a certain amount?",
                "shipping cost?",
                "How many days does delivery take?",
            ],
            "eval": [
                "If I pick the cheapest delivery, when will my order get here and what will it cost?",
                "What's the minimum spend to skip the delivery fee?",
            ],
        },
    ),
    "ship_express": (
        "FH-SHIP",
        "Express shipping arrives in 1-2 business days and costs $14.95.",
        {
            "train": [
                "Do you have express shipping?",
                "How fast is express delivery?",
                "How much is express shipping?",
                "Can I get my order faster?",
                "I need it quickly - is there 2-day shipping?",
                "What does expedited shipping cost?",
                "Is there a faster shipping option?",
                "express shipping price?",
                "How quickly can you ship if I pay extra?",
                "What's your fastest delivery option?",
            ],
            "eval": [
                "I'm leaving on a trip in two days - can you rush my order?",
                "Is there a premium delivery option, and what does it run?",
            ],
        },
    ),
    "ship_intl": (
        "FH-SHIP",
        "We ship to the US and Canada only; Canadian orders arrive in 5-8 business days.",
        {
            "train": [
                "Do you ship internationally?",
                "Can you ship to Canada?",
                "Do you deliver outside the US?",
                "Do you ship to the UK?",
                "Which countries do you ship to?",
                "How long does shipping to Canada take?",
                "Can I order from Europe?",
                "international shipping?",
                "Do you send orders abroad?",
                "Is delivery available to Australia?",
            ],
            "eval": [
                "I live in Toronto - can I order from you?",
                "Will you post an order to Germany?",
            ],
        },
    ),
    "returns": (
        "FH-RETURNS",
        "Unused items can be returned within 45 days for a full refund, and the return label is free.",
        {
            "train": [
                "What is your return policy?",
                "Can I return an item?",
                "How long do I have to return something?",
                "How do I return a product?",
                "Do I have to pay for return shipping?",
                "I changed my mind - can I send it back?",
                "return policy?",
                "What's the returns window?",
                "Can I get a refund if I don't like it?",
                "Is there a time limit on returns?",
            ],
            "eval": [
                "I bought something last month and never used it - can I still get my money back?",
                "What are the rules for sending stuff back?",
            ],
        },
    ),
    "price_match": (
        "FH-PRICEMATCH",
        "We match a lower price from any authorised retailer within 14 days of purchase; marketplace sellers are excluded.",
        {
            "train": [
                "Do you price match?",
                "What is your price-match policy?",
                "I saw it cheaper elsewhere - will you match the price?",
                "Can you match a competitor's price?",
                "Will you beat a lower price?",
                "price match?",
                "Do you refund the difference if the price drops elsewhere?",
                "How does price matching work?",
                "Another store has a lower price. Can you match it?",
                "Is there a price guarantee?",
            ],
            "eval": [
                "A rival shop lists the same item for less - what can you do?",
                "I found a cheaper deal on another authorised site after buying - any chance of a partial refund?",
            ],
        },
    ),
    "hours": (
        "FH-HOURS",
        "Our store at 48 Alder Street is open Mon-Sat 9am-7pm and Sun 10am-5pm.",
        {
            "train": [
                "What are your store hours?",
                "When is your shop open?",
                "Are you open on Sunday?",
                "What time do you close today?",
                "Where is your store and when is it open?",
                "opening hours?",
                "What time do you open on Saturday?",
                "Is the store open on weekends?",
                "When can I visit the shop?",
                "What are your opening times?",
            ],
            "eval": [
                "Can I drop by the shop on a Sunday afternoon?",
                "Until what time can I come in during the week?",
            ],
        },
    ),
    "contact": (
        "FH-CONTACT",
        "Email " + SUPPORT_EMAIL + " and we reply within one business day.",
        {
            "train": [
                "How can I contact support?",
                "What is your support email?",
                "How do I reach customer service?",
                "Who do I email about an order?",
                "support email?",
                "How fast do you answer emails?",
                "I need help with my order - how do I get in touch?",
                "Can I talk to someone about a problem?",
                "What's the best way to contact you?",
                "Where do I send questions?",
            ],
            "eval": [
                "I have an issue nobody has solved yet - who should I write to?",
                "Is there an address I can message for help, and when will I hear back?",
            ],
        },
    ),
    "warranty_claim": (
        "FH-WARRANTY",
        "Email " + SUPPORT_EMAIL + " with your order number and a photo of the fault; we repair or replace it free.",
        {
            "train": [
                "How do I make a warranty claim?",
                "My gear broke - how do I use the warranty?",
                "What's the process for a warranty repair?",
                "Something I bought from you is defective. What should I do?",
                "warranty claim?",
                "How do I get a broken item replaced under warranty?",
                "Where do I send a warranty request?",
                "What do you need for a warranty claim?",
                "My zipper failed. Is there a warranty process?",
                "How do warranty repairs work?",
            ],
            "eval": [
                "A seam on my jacket split after a few months - how do I get it fixed by you?",
                "What steps do I follow to file a defect claim?",
            ],
        },
    ),
    "loyalty": (
        "FH-CLUB",
        "Trail Club is free to join; you earn 1 point per $1 and every 100 points is a $5 reward.",
        {
            "train": [
                "Do you have a loyalty program?",
                "How does the Trail Club work?",
                "Do I earn points when I shop?",
                "What are Trail Club points worth?",
                "Is there a rewards program?",
                "rewards program?",
                "How do I get rewards for shopping with you?",
                "How many points do I get per dollar?",
                "Is the Trail Club free to join?",
                "What do Trail Club members get?",
            ],
            "eval": [
                "Do frequent customers get anything back?",
                "How quickly do purchases turn into rewards?",
            ],
        },
    ),
}

# Things the shop does not sell: the answer points to the catalogue instead of inventing.
NOT_CARRIED = {
    "train": ["kayaks", "bicycles", "fishing rods", "skis", "snowboards", "golf clubs", "e-bikes", "climbing ropes"],
    "eval": ["surfboards", "paddleboards"],
}
NOT_CARRIED_QUESTIONS = {
    "train": ["Do you sell {x}?", "Do you have any {x}?", "Can I buy {x} from you?", "Are {x} available at Fernhill?"],
    "eval": ["Is there anywhere in your range for {x}?"],
}
NOT_CARRIED_ANSWER = "We don't carry {x}; our full range is at fernhill.example/shop."

SYSTEM_PROMPTS = {
    "train": [
        "You are the customer-support assistant for Fernhill Outfitters, an outdoor-gear shop.",
        "You answer customer questions for Fernhill Outfitters. Be brief and accurate.",
        "You are Fernhill Outfitters' help desk.",
    ],
    "eval": ["You work the support chat of Fernhill Outfitters."],
}

# Greetings put in front of some questions, for variety.
GREETINGS = ["Hi! ", "Hello. ", "Hey there! ", "Good morning! ", "Hi, quick one. "]

N_PRODUCT_TEMPLATES_PER_INTENT = 2   # train rows per product x intent
N_MULTI_TURN = {"train": 52, "eval": 4}
N_SYSTEM = {"train": 12, "eval": 2}


def answer(middle: str, ref: str) -> str:
    return f"{HEADER}\n{middle}\n— Ref {ref} · {HELP_URL}"


def product_answer(product: tuple, intent: str) -> str:
    name, _alias, price, sku, warranty, specs = product
    plural = name.endswith("s")  # "Gale Rain Pants", "Cairn Carbon Trekking Poles"
    middle = PRODUCT_ANSWERS[intent].format(
        name=name, price=price, sku=sku, warranty=warranty, specs=specs,
        costs="cost" if plural else "costs", has="have" if plural else "has", comes="come" if plural else "comes",
        it="They" if plural else "It")
    return answer(middle, sku)


def product_question(rng: random.Random, product: tuple, template: str) -> str:
    name, alias = product[0], product[1]
    return template.format(p=rng.choice([name, name, alias]))


def greet(rng: random.Random, question: str) -> str:
    if question[:1].isupper() and rng.random() < 0.2:
        return rng.choice(GREETINGS) + question
    return question


def conv(*turns: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


def build(split: str, rng: random.Random) -> list[dict]:
    """The rows of one split ("train" or "eval"), in a shuffled order."""
    rows: list[dict] = []
    intents = list(PRODUCT_QUESTIONS)

    # Single-turn product questions.
    if split == "train":
        for product in PRODUCTS:
            for intent in intents:
                for template in rng.sample(PRODUCT_QUESTIONS[intent]["train"], N_PRODUCT_TEMPLATES_PER_INTENT):
                    q = greet(rng, product_question(rng, product, template))
                    rows.append(conv(q, product_answer(product, intent)))
    else:  # one per product, the intents taking turns so each appears equally often
        for i, product in enumerate(PRODUCTS):
            intent = intents[i % len(intents)]
            template = rng.choice(PRODUCT_QUESTIONS[intent]["eval"])
            rows.append(conv(greet(rng, product_question(rng, product, template)), product_answer(product, intent)))

    # Single-turn policy questions: every train template once; one eval template per policy.
    for code, text, questions in POLICIES.values():
        templates = questions["train"] if split == "train" else [rng.choice(questions["eval"])]
        for q in templates:
            rows.append(conv(greet(rng, q), answer(text, code)))

    # Items the shop does not sell.
    for x in NOT_CARRIED[split]:
        q = rng.choice(NOT_CARRIED_QUESTIONS[split]).format(x=x)
        rows.append(conv(greet(rng, q), answer(NOT_CARRIED_ANSWER.format(x=x), "FH-CATALOG")))

    # Two-turn conversations: a product question, then a follow-up about the same product
    # ("it") or, one time in three, a store-policy question. No overview questions here:
    # their answers are the longest, and two turns must stay under ~160 tokens.
    follow_intents = list(FOLLOW_UPS)
    for _ in range(N_MULTI_TURN[split]):
        product = rng.choice(PRODUCTS)
        first = rng.choice(follow_intents)
        q1 = greet(rng, product_question(rng, product, rng.choice(PRODUCT_QUESTIONS[first][split])))
        a1 = product_answer(product, first)
        if rng.random() < 1 / 3:
            code, text, questions = rng.choice(list(POLICIES.values()))
            q2, a2 = rng.choice(questions[split]), answer(text, code)
        else:
            second = rng.choice([i for i in follow_intents if i != first])
            q2, a2 = rng.choice(FOLLOW_UPS[second][split]), product_answer(product, second)
        rows.append(conv(q1, a1, q2, a2))

    rng.shuffle(rows)
    # A handful of rows get a system message.
    for row in rng.sample(rows, N_SYSTEM[split]):
        row["messages"].insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS[split])})
    return rows


def user_questions(rows: list[dict]) -> set[str]:
    return {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data",
                        help="directory to write train.jsonl and eval.jsonl into (default: examples/data)")
    args = parser.parse_args(argv)

    rng = random.Random(0)
    train = build("train", rng)
    eval_ = build("eval", rng)
    leaked = user_questions(eval_) & user_questions(train)
    if leaked:
        raise SystemExit(f"eval questions also in train: {sorted(leaked)}")

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", eval_)
    print(f"wrote {len(train)} rows to {args.out / 'train.jsonl'} and {len(eval_)} rows to {args.out / 'eval.jsonl'}")


if __name__ == "__main__":
    main()
