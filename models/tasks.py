"""Seeded synthetic tasks: structured extraction (JSON Schema) and short prose.

A structured example is an instruction, a JSON Schema and a short text that mentions the values;
its target is the JSON instance (compact, keys in schema order). A prose example is a request for
one or two sentences about a topic. Every example is a pure function of ``(split, seed, index)``.

Train and evaluation data never overlap: each example's prompt is hashed into one of 16 buckets,
bucket 0 is reserved for evaluation, and the generator of each split skips prompts from the other
split's buckets. So any evaluation seed yields held-out prompts.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Iterator, Literal

Split = Literal["train", "eval"]
Kind = Literal["json", "prose"]

FIRST_NAMES = ["Alice", "Bruno", "Chen", "Dana", "Elif", "Farah", "Goran", "Hana", "Ivan", "Jamal",
               "Kira", "Liam", "Maya", "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara",
               "Umar", "Vera", "Wen", "Ximena", "Yusuf", "Zoe"]
LAST_NAMES = ["Smith", "Okafor", "Tanaka", "Garcia", "Novak", "Haddad", "Larsen", "Kowalski",
              "Moreau", "Silva", "Kim", "Patel", "Rossi", "Weber", "Dubois", "Ivanova"]
CITIES = ["Paris", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Seoul", "Rome",
          "Berlin", "Austin", "Nairobi", "Hanoi", "Porto", "Dublin", "Madrid", "Denver", "Perth"]
COLORS = ["red", "green", "blue", "black", "white", "orange", "purple", "yellow", "grey", "teal"]
WORDS = ["alpha", "river", "stone", "cloud", "maple", "ember", "delta", "north", "pixel", "cedar",
         "lunar", "spark", "orbit", "harbor", "quartz", "willow", "summit", "canyon", "meadow"]
PRODUCTS = ["lamp", "chair", "kettle", "bicycle", "backpack", "monitor", "notebook", "guitar",
            "jacket", "camera", "blender", "tent", "helmet", "printer"]
DOMAINS = ["example.com", "mail.org", "test.net", "corp.io"]

# Field name -> value type. Types: str(kind), int(lo,hi), num, bool, enum, list(kind), obj.
STRING_FIELDS = {"name": "person", "city": "city", "color": "color", "email": "email",
                 "title": "word", "product": "product", "owner": "person", "code": "code",
                 "country_city": "city", "label": "word", "brand": "word", "author": "person"}
INT_FIELDS = {"age": (18, 90), "count": (0, 500), "year": (1950, 2030), "quantity": (1, 99),
              "rating": (1, 5), "floor": (0, 40), "pages": (10, 900), "score": (0, 100)}
NUM_FIELDS = {"price": (1, 999), "weight": (0, 120), "height": (1, 3), "temperature": (-20, 45),
              "discount": (0, 1)}
BOOL_FIELDS = ["active", "verified", "available", "paid", "shipped", "public"]
ENUM_FIELDS = {"status": ["open", "closed", "pending"], "size": ["small", "medium", "large"],
               "priority": ["low", "normal", "high", "urgent"], "mode": ["auto", "manual"],
               "level": ["beginner", "expert"], "tier": ["free", "pro", "team"]}
LIST_FIELDS = {"tags": "word", "colors": "color", "cities": "city", "scores": "int"}
OBJECT_FIELDS = {"address": ["city", "floor"], "contact": ["name", "email"],
                 "item": ["product", "price"], "owner_info": ["name", "age"]}

INSTRUCTIONS = [
    "Extract the data as JSON matching the schema.",
    "Return a JSON object that follows the schema.",
    "Fill the schema from the text. Answer with JSON only.",
    "Convert the text into JSON using this schema.",
]
PROSE_TOPICS = {"city": CITIES, "color": COLORS, "product": PRODUCTS}
PROSE_INSTRUCTIONS = ["Write a short sentence about {t}.", "Describe {t} in a few words.",
                      "Tell me something about {t}."]
PROSE_TEMPLATES = {
    "city": ["{t} is a busy city with old streets and many parks.",
             "{t} has a large market, a river and friendly people.",
             "People visit {t} for its food, its music and its history."],
    "color": ["{t} is a calm color that many people like.",
              "The color {t} appears in flags, flowers and paintings.",
              "Artists use {t} to make a picture feel warm or cold."],
    "product": ["A good {t} is simple to use and lasts for years.",
                "This {t} is light, strong and easy to carry.",
                "Many shops sell a {t} at a fair price."],
}
PROSE_EXTRA = ["It is worth a visit in spring.", "Most people remember it for a long time.",
               "It is often mentioned in stories.", "Many guides describe it in detail."]


@dataclass(frozen=True)
class Example:
    kind: Kind
    instruction: str  # the full user message
    schema: dict[str, Any] | None  # JSON Schema for kind == "json"
    target: str  # the answer text (compact JSON for kind == "json")


def _value(rng: random.Random, kind: str) -> Any:
    if kind == "person":
        return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    if kind == "city":
        return rng.choice(CITIES)
    if kind == "color":
        return rng.choice(COLORS)
    if kind == "email":
        return f"{rng.choice(FIRST_NAMES).lower()}@{rng.choice(DOMAINS)}"
    if kind == "product":
        return rng.choice(PRODUCTS)
    if kind == "code":
        return f"{rng.choice('ABCDEFGHKMNPRSTX')}{rng.randint(100, 999)}"
    if kind == "int":
        return rng.randint(0, 100)
    return rng.choice(WORDS)


def _field(rng: random.Random, name: str, depth: int) -> tuple[dict[str, Any], Any]:
    """Return (property schema, value) for a field name."""
    if name in STRING_FIELDS:
        return {"type": "string"}, _value(rng, STRING_FIELDS[name])
    if name in INT_FIELDS:
        lo, hi = INT_FIELDS[name]
        schema: dict[str, Any] = {"type": "integer"}
        if rng.random() < 0.3:
            schema.update(minimum=lo, maximum=hi)
        return schema, rng.randint(lo, hi)
    if name in NUM_FIELDS:
        lo, hi = NUM_FIELDS[name]
        return {"type": "number"}, round(rng.uniform(lo, hi), rng.choice([1, 2]))
    if name in BOOL_FIELDS:
        return {"type": "boolean"}, rng.random() < 0.5
    if name in ENUM_FIELDS:
        choices = ENUM_FIELDS[name]
        return {"type": "string", "enum": list(choices)}, rng.choice(choices)
    if name in LIST_FIELDS:
        kind = LIST_FIELDS[name]
        items = {"type": "integer"} if kind == "int" else {"type": "string"}
        values = [_value(rng, kind) for _ in range(rng.randint(1, 3))]
        return {"type": "array", "items": items}, values
    sub_names = OBJECT_FIELDS[name]
    props, value = {}, {}
    for sub in sub_names:
        props[sub], value[sub] = _field(rng, sub, depth + 1)
    return {"type": "object", "properties": props, "required": list(sub_names)}, value


def _mention(name: str, value: Any) -> str:
    label = name.replace("_", " ")
    if isinstance(value, bool):
        return f"{label}: {'yes' if value else 'no'}"
    if isinstance(value, list):
        return f"{label}: " + ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return f"{label} (" + ", ".join(_mention(k, v) for k, v in value.items()) + ")"
    return f"{label}: {value}"


def _json_example(rng: random.Random) -> Example:
    pools = [list(STRING_FIELDS), list(INT_FIELDS), list(NUM_FIELDS), BOOL_FIELDS,
             list(ENUM_FIELDS), list(LIST_FIELDS), list(OBJECT_FIELDS)]
    weights = [5, 4, 2, 2, 3, 2, 1]
    n_fields = rng.randint(2, 6)
    names: list[str] = []
    while len(names) < n_fields:
        pool = rng.choices(pools, weights)[0]
        name = rng.choice(pool)
        if name not in names:
            names.append(name)
    props: dict[str, Any] = {}
    values: dict[str, Any] = {}
    required: list[str] = []
    for name in names:
        props[name], value = _field(rng, name, 0)
        if rng.random() < 0.8:
            required.append(name)
            values[name] = value
        elif rng.random() < 0.5:  # optional field that the text happens to mention
            values[name] = value
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    mentions = [_mention(k, v) for k, v in values.items()]
    if rng.random() < 0.5:  # half the texts mention values in another order than the schema
        rng.shuffle(mentions)
    text = "; ".join(mentions) + "." if mentions else "Nothing is known."
    instruction = (f"{rng.choice(INSTRUCTIONS)}\nSchema: {json.dumps(schema, separators=(',', ':'))}\n"
                   f"Text: {text}")
    target = json.dumps(values, separators=(",", ":"))
    return Example("json", instruction, schema, target)


def _prose_example(rng: random.Random) -> Example:
    topic_kind = rng.choice(sorted(PROSE_TOPICS))
    topic = rng.choice(PROSE_TOPICS[topic_kind])
    instruction = rng.choice(PROSE_INSTRUCTIONS).format(t=topic)
    sentences = [rng.choice(PROSE_TEMPLATES[topic_kind]).format(t=topic)]
    for extra in rng.sample(PROSE_EXTRA, rng.randint(0, 3)):
        sentences.append(extra)
    text = " ".join(sentences)
    return Example("prose", instruction, None, text[0].upper() + text[1:])


def _bucket(example: Example) -> int:
    return hashlib.sha256(example.instruction.encode()).digest()[0] % 16


def example(split: Split, seed: int, index: int, kind: Kind | None = None) -> Example:
    """The ``index``-th example of ``split`` for ``seed``; deterministic, split-disjoint."""
    attempt = 0
    while True:
        rng = random.Random(f"{split}:{seed}:{index}:{attempt}")
        chosen = kind or ("prose" if rng.random() < 0.2 else "json")
        ex = _json_example(rng) if chosen == "json" else _prose_example(rng)
        if (_bucket(ex) == 0) == (split == "eval"):
            return ex
        attempt += 1


def examples(split: Split, seed: int, n: int, kind: Kind | None = None) -> Iterator[Example]:
    for i in range(n):
        yield example(split, seed, i, kind)


def corpus_lines(n: int, seed: int = 0) -> Iterator[str]:
    """Text for tokenizer training: instructions and targets of training examples."""
    for ex in examples("train", seed, n):
        yield ex.instruction
        yield ex.target
