"""The quality benchmark's data: 8 users x 5 invented facts, and general questions.

Every user has the same five kinds of fact (a dog, a home town, an employer, a locker number,
a best friend) with invented values the base model cannot guess, so all users are asked the
same questions and an answer holding another user's value is a leak. Each kind has 2-3 training
phrasings and 2 held-out paraphrases that training never sees. ``fact`` is the string an answer
must contain to count as recalled.
"""

from __future__ import annotations

from dataclasses import dataclass

from vera_core.general_prompts import PROBE


@dataclass(frozen=True)
class FactKind:
    answer: str  # "... {} ..." filled with the user's value
    trained: tuple[str, ...]  # questions in the training data
    paraphrases: tuple[str, ...]  # held out: asked only at evaluation


KINDS = (
    FactKind(
        "Your dog's name is {}.",
        ("What is my dog's name?", "What's my dog called?", "Tell me my dog's name."),
        ("Do you remember what my dog is called?", "What name did I give my dog?"),
    ),
    FactKind(
        "You grew up in {}.",
        ("Where did I grow up?", "What is my home town?"),
        ("Which town am I from?", "Where was I raised?"),
    ),
    FactKind(
        "You work at {}.",
        ("Where do I work?", "Which company do I work for?", "Who is my employer?"),
        ("What company employs me?", "Where is my job?"),
    ),
    FactKind(
        "Your locker number is {}.",
        ("What is my locker number?", "Which locker is mine?"),
        ("Tell me the number of my locker.", "What number does my locker have?"),
    ),
    FactKind(
        "Your best friend is {}.",
        ("Who is my best friend?", "What is my best friend's name?", "Who's my closest friend?"),
        ("Do you know who my best friend is?", "Tell me the name of my best friend."),
    ),
)

# user -> one value per kind: (full value in the answer, the string that must be recalled)
USERS: dict[str, tuple[tuple[str, str], ...]] = {
    "ana": (
        ("Biscotto", "Biscotto"),
        ("Zorbania", "Zorbania"),
        ("Feldspar Robotics", "Feldspar"),
        ("4417", "4417"),
        ("Oskar Brannigan", "Brannigan"),
    ),
    "ben": (
        ("Pimbleton", "Pimbleton"),
        ("Quendale", "Quendale"),
        ("Ostrander Mills", "Ostrander"),
        ("2983", "2983"),
        ("Mireille Vantou", "Vantou"),
    ),
    "chloe": (
        ("Wuzzles", "Wuzzles"),
        ("Mirrowby", "Mirrowby"),
        ("Kavlo Systems", "Kavlo"),
        ("7156", "7156"),
        ("Tobiah Quenneville", "Quenneville"),
    ),
    "dev": (
        ("Grommet", "Grommet"),
        ("Trellford", "Trellford"),
        ("Brindlewood Labs", "Brindlewood"),
        ("3641", "3641"),
        ("Sunniva Arkwright", "Arkwright"),
    ),
    "eli": (
        ("Taffeta", "Taffeta"),
        ("Vastholm", "Vastholm"),
        ("Quillfeather Bakery", "Quillfeather"),
        ("8829", "8829"),
        ("Lazlo Penhallow", "Penhallow"),
    ),
    "fay": (
        ("Nubbin", "Nubbin"),
        ("Kelbrook", "Kelbrook"),
        ("Umbrecht Freight", "Umbrecht"),
        ("5302", "5302"),
        ("Ottilie Marchbank", "Marchbank"),
    ),
    "gus": (
        ("Quibble", "Quibble"),
        ("Drennick", "Drennick"),
        ("Pollux Orchards", "Pollux"),
        ("6074", "6074"),
        ("Idris Fennimore", "Fennimore"),
    ),
    "hana": (
        ("Zephyrine", "Zephyrine"),
        ("Yarrowmere", "Yarrowmere"),
        ("Varnhelm Studio", "Varnhelm"),
        ("1938", "1938"),
        ("Petronella Quist", "Quist"),
    ),
}

# General questions with the string a right answer holds: the trainer's held-out probe (never
# among the prompts training keeps the base model's answers on)
GENERAL = PROBE

# The continual row: one user, three jobs of five facts each, in this order (answer, trained
# questions, the string recall needs)
CONTINUAL: tuple[tuple[tuple[str, tuple[str, ...], str], ...], ...] = (
    tuple(
        (kind.answer.format(value), kind.trained, fact)
        for kind, (value, fact) in zip(KINDS, USERS["ana"])
    ),
    (
        (
            "Your cat's name is Fennick.",
            ("What is my cat's name?", "What's my cat called?"),
            "Fennick",
        ),
        (
            "You drive a Varlo Sprite.",
            ("What car do I drive?", "What kind of car do I have?"),
            "Varlo",
        ),
        (
            "You live on Gossamer Lane.",
            ("What street do I live on?", "Which street is my home on?"),
            "Gossamer",
        ),
        (
            "Your sister is named Ysolde.",
            ("What is my sister's name?", "Who is my sister?"),
            "Ysolde",
        ),
        (
            "Your favourite band is The Quartzmen.",
            ("What is my favourite band?", "Which band do I love most?"),
            "Quartzmen",
        ),
    ),
    (
        (
            "You went to Halvering Academy.",
            ("Which school did I go to?", "Where did I study?"),
            "Halvering",
        ),
        (
            "Your gym is Ironvale Gym.",
            ("Which gym do I go to?", "Where do I work out?"),
            "Ironvale",
        ),
        (
            "Your doctor is Dr. Okonkwo-Lind.",
            ("Who is my doctor?", "What is my doctor's name?"),
            "Okonkwo",
        ),
        (
            "Your boat is called Saltwhistle.",
            ("What is my boat called?", "What's the name of my boat?"),
            "Saltwhistle",
        ),
        (
            "Your favourite dish is brindleberry pie.",
            ("What is my favourite dish?", "What food do I like most?"),
            "brindleberry",
        ),
    ),
)


def continual_rows(job: int) -> list[dict]:
    """The training file of continual job ``job`` (0, 1, 2)."""
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for a, qs, _ in CONTINUAL[job]
        for q in qs
    ]


@dataclass(frozen=True)
class Question:
    user: str
    text: str
    fact: str  # the string a right answer contains
    held_out: bool  # a paraphrase never trained on


def training_rows(user: str) -> list[dict]:
    """The user's training file: one chat example per (kind, trained phrasing)."""
    return [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": kind.answer.format(value)},
            ]
        }
        for kind, (value, _) in zip(KINDS, USERS[user])
        for q in kind.trained
    ]


def questions(user: str) -> list[Question]:
    """Every trained question and every held-out paraphrase, for this user."""
    return [
        Question(user, q, fact, held_out)
        for kind, (_, fact) in zip(KINDS, USERS[user])
        for held_out, qs in ((False, kind.trained), (True, kind.paraphrases))
        for q in qs
    ]


def facts_of(user: str) -> tuple[str, ...]:
    return tuple(fact for _, fact in USERS[user])
