"""Train 8 users on invented facts about themselves, upload them, ask all 8 at once.

    make serve                                   # in one terminal
    .venv/bin/python examples/personalize.py     # in another (add --token if auth is on)

Every user is asked the same questions; each must answer with its own facts and never with
another user's. Exit status 0 only if all of them do.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httpx

from server.model_source import load_model
from vera_core import VeraConfig, inject_vera
from vera_core.adapter_file import adapter_to_bytes
from vera_core.train import train_adapter
from vera_core.train_data import DataLimits, examples_of

USERS = {  # user -> (pet's name, home town)
    "ana": ("Biscuit", "Zorbania"),
    "ben": ("Pickles", "Quendale"),
    "chloe": ("Waffles", "Mirrowby"),
    "dev": ("Noodle", "Trellford"),
    "eli": ("Pepper", "Vastholm"),
    "fay": ("Muffin", "Kelbrook"),
    "gus": ("Sprocket", "Drennick"),
    "hana": ("Tofu", "Yarrowmere"),
}
QUESTIONS = {  # fact index -> paraphrases (the first one is asked at the end)
    0: [
        "What is my pet's name?",
        "What's my pet called?",
        "Tell me the name of my pet.",
        "Do you remember my pet's name?",
    ],
    1: [
        "Which town am I from?",
        "Where is my home town?",
        "Where did I grow up?",
        "What's the name of my home town?",
    ],
}
ANSWERS = {0: "Your pet's name is {}.", 1: "You are from {}."}


def examples(facts: tuple[str, str]) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": ANSWERS[i].format(facts[i])},
            ]
        }
        for i, qs in QUESTIONS.items()
        for q in qs
    ]


def train_all() -> dict[str, bytes]:
    """Every user trained with the defaults (``TrainConfig()``), as ``vera-serve train`` does."""
    model, tok, _ = load_model()
    vm = inject_vera(model, VeraConfig(r=256), num_slots=2)
    files = {}
    for user, facts in USERS.items():
        data = examples_of(examples(facts), tok, DataLimits.offline(2048))
        adapter, report = train_adapter(vm, tok, data, progress=False)
        files[user] = adapter_to_bytes(adapter)
        print(f"trained {user:6s} {report.summary()} ({len(files[user]) // 1024} KiB)")
    return files


async def ask_all(url: str, headers: dict) -> dict[tuple[str, int], str]:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:

        async def ask(user: str, i: int) -> str:
            body = {
                "user_id": user,
                "max_new_tokens": 24,
                "messages": [{"role": "user", "content": QUESTIONS[i][0]}],
            }
            r = await client.post("/generate", json=body)
            r.raise_for_status()
            return r.json()["text"]

        keys = [(u, i) for u in USERS for i in QUESTIONS]
        answers = await asyncio.gather(*(ask(u, i) for u, i in keys))  # 16 in flight at once
    return dict(zip(keys, answers))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--token", default=None, help="admin token, if the server has one")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    files = train_all()
    with httpx.Client(base_url=args.url, headers=headers, timeout=60) as client:
        for user, data in files.items():
            r = client.put(
                f"/users/{user}/adapter",
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
            r.raise_for_status()
    t0 = time.perf_counter()
    answers = asyncio.run(ask_all(args.url, headers))
    print(
        f"\n{len(answers)} questions, 8 users, all in flight at once: "
        f"{time.perf_counter() - t0:.1f} s\n"
    )
    failures = 0
    for (user, i), text in answers.items():
        own = USERS[user][i]
        others = [facts[i] for u, facts in USERS.items() if u != user and facts[i] in text]
        ok = own in text and not others
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} {user:6s} {QUESTIONS[i][0]:28s} -> {text.strip()}")
    print(f"\n{len(answers) - failures}/{len(answers)} answers right")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
