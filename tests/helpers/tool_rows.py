"""OpenAI function-calling fine-tuning rows for the tool-calling tests: two tools (the weather and the time
in a city), questions phrased several ways, and conversations that go user → call → tool result → answer.
Held-out questions pair each city with phrasings the training rows never use for it."""

from __future__ import annotations

import json
import random
from typing import Any

CITIES = [
    "Paris",
    "Oslo",
    "Rome",
    "Lima",
    "Cairo",
    "Tokyo",
    "Berlin",
    "Madrid",
    "Dublin",
    "Vienna",
    "Prague",
    "Athens",
    "Lisbon",
    "Warsaw",
    "Seoul",
    "Delhi",
    "Nairobi",
    "Quito",
    "Hanoi",
    "Riga",
    "Sofia",
    "Zagreb",
    "Havana",
    "Manila",
    "Dakar",
    "Accra",
    "Kyiv",
    "Minsk",
    "Doha",
    "Muscat",
]
ASK = {
    "get_weather": [
        "What is the weather in {c}?",
        "How is the weather in {c} today?",
        "Is it raining in {c}?",
        "Tell me the weather for {c}.",
        "Weather in {c}, please.",
        "Will it be sunny in {c}?",
    ],
    "get_time": [
        "What time is it in {c}?",
        "Tell me the time in {c}.",
        "What is the local time in {c}?",
        "Time in {c}, please.",
        "Do you know the time in {c}?",
        "What hour is it now in {c}?",
    ],
}
RESULT = {
    "get_weather": ["sunny", "rainy", "cloudy", "windy"],
    "get_time": ["9 am", "noon", "6 pm", "midnight"],
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {what} in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    for name, what in (("get_weather", "weather"), ("get_time", "local time"))
]


def held_out(c: int, k: int) -> bool:
    """Which (city, phrasing) pairs are kept out of training."""
    return (c + k) % 3 == 0


def question(rng: random.Random, *, train: bool) -> tuple[str, str, str]:
    """(question, the tool it needs, the city)."""
    while True:
        name = rng.choice(sorted(ASK))
        c, k = rng.randrange(len(CITIES)), rng.randrange(len(ASK[name]))
        if held_out(c, k) != train:
            return ASK[name][k].format(c=CITIES[c]), name, CITIES[c]


def rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Training rows: a call alone, or the call, its result and the answer."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text, name, city = question(rng, train=True)
        call = {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps({"city": city})},
        }
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": text},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ]
        if i % 2:
            result = rng.choice(RESULT[name])
            messages += [
                {"role": "tool", "tool_call_id": call["id"], "content": result},
                {"role": "assistant", "content": f"In {city} it is {result}."},
            ]
        out.append({"messages": messages, "tools": TOOLS})
    return out
