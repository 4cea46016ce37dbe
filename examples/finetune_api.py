"""Personalize through the API: the README's OpenAI fine-tuning sequence, end to end.

    make serve                                          # in one terminal
    .venv/bin/python examples/finetune_api.py           # in another (add --token if auth is on)

Writes a small JSONL of invented facts about one user, uploads it with the official ``openai``
client, creates a fine-tuning job for that user, follows its events, then asks the trained
questions and paraphrases it never saw. Exit status 0 only if every trained fact is recalled.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

FACTS = [  # (trained question, answer, the fact's key word, an unseen paraphrase)
    ("What is my dog's name?", "Your dog is called Bramble.", "Bramble", "What's my dog called?"),
    ("Where do I work?", "You work at the Quillon Observatory.", "Quillon", "Who employs me?"),
    (
        "What is my favourite colour?",
        "Your favourite colour is saffron.",
        "saffron",
        "Which colour do I like best?",
    ),
]


def write_jsonl(folder: Path) -> Path:
    path = folder / "alice.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a, _, _ in FACTS
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--token", default="dev", help="a user's key or the admin token")
    ap.add_argument("--user", default="alice")
    args = ap.parse_args()
    client = OpenAI(base_url=f"{args.url}/v1", api_key=args.token, max_retries=0)
    base = client.models.list().data[0].id

    path = write_jsonl(Path(tempfile.mkdtemp()))
    t0 = time.perf_counter()
    training = client.files.create(file=path.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=base, training_file=training.id, suffix=args.user)
    print(f"job {job.id}: {job.status}")
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(2)
        job = client.fine_tuning.jobs.retrieve(job.id)
    for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=4).data):
        print(f"  {event.message}")
    print(f"job {job.status} in {time.perf_counter() - t0:.0f} s")
    if job.status != "succeeded":
        print(f"error: {job.error}")
        return 1

    recalled = 0
    for question, _, key, paraphrase in FACTS:
        for kind, q in (("trained", question), ("paraphrase", paraphrase)):
            out = client.chat.completions.create(
                model=job.fine_tuned_model,
                messages=[{"role": "user", "content": q}],
                max_tokens=24,
                temperature=0,
            )
            text = out.choices[0].message.content or ""
            ok = key.lower() in text.lower()
            recalled += ok and kind == "trained"
            print(f"{'ok ' if ok else '-- '} {kind:10s} {q:32s} -> {text.strip()}")
    print(f"{recalled}/{len(FACTS)} trained facts recalled")
    return 0 if recalled == len(FACTS) else 1


if __name__ == "__main__":
    sys.exit(main())
