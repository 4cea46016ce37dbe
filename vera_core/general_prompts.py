"""General prompts shipped with the trainer, in two disjoint sets.

``ANCHOR_PROMPTS`` is what training keeps the model's behaviour on: the base model answers each
once, and a job pays a KL penalty for moving its distribution over those answers (see
``vera_core.retention``). Varied on purpose: facts, arithmetic, definitions, instructions,
rewriting, advice and chat, so the penalty covers more than one kind of answer.

``PROBE`` is held out from training and measures what a job kept: each question has a key the
right answer contains. Retention is the share of the questions the base model answers right
(its answer holds the key) that the trained model still answers right. No prompt of one set
appears in the other.
"""

from __future__ import annotations

ANCHOR_PROMPTS: tuple[str, ...] = (
    # facts
    "What is the capital of Germany?",
    "What is the capital of Spain?",
    "What is the capital of Canada?",
    "What is the largest planet in our solar system?",
    "Who wrote Romeo and Juliet?",
    "What is the tallest mountain in the world?",
    "Which ocean is the largest?",
    "What gas do plants take in from the air?",
    "What is the freezing point of water in Fahrenheit?",
    "Who was the first person to walk on the Moon?",
    "What is the longest river in Africa?",
    "What language is spoken in Brazil?",
    "What is the currency of Japan?",
    "How many continents are there?",
    "What is the chemical symbol for gold?",
    "What planet is known as the Red Planet?",
    # arithmetic and counting
    "What is 7 times 8?",
    "What is 15 plus 27?",
    "What is 100 divided by 4?",
    "What is 9 minus 3?",
    "How many minutes are in an hour?",
    "How many legs does a spider have?",
    "What is half of 50?",
    "How many months are in a year?",
    # definitions and explanations
    "What is photosynthesis?",
    "Explain what a noun is.",
    "What does a thermometer measure?",
    "What is the difference between weather and climate?",
    "What is a prime number?",
    "Why is the sky blue?",
    "What is gravity?",
    "What does a computer's CPU do?",
    # instructions and rewriting
    "Give me three tips for staying focused while studying.",
    "Write a short poem about autumn leaves.",
    "Translate 'good morning' into French.",
    "List three fruits that are red.",
    "Summarize the story of Cinderella in one sentence.",
    "Write a haiku about the ocean.",
    "Rewrite this sentence more politely: Give me the report now.",
    "Suggest a name for a pet goldfish.",
    "Give me a synonym for happy.",
    "What is the plural of mouse?",
    "Spell the word 'necessary' backwards.",
    "Describe a cat in three words.",
    # advice and chat
    "Hello! How are you today?",
    "Can you recommend a good way to start the morning?",
    "I feel tired. What should I do?",
    "What are some healthy breakfast ideas?",
    "How can I improve my sleep?",
    "Tell me a fun fact about octopuses.",
    "What should I pack for a beach trip?",
    "How do I make a cup of tea?",
    "Thank you for your help!",
    "What is a good hobby to learn this year?",
    # questions about the assistant and the user
    "Who are you?",
    "What can you help me with?",
    "Do you know my name?",
    "What did I tell you about my family?",
    "What is my favorite food?",
    "Where do I live?",
    "Can you remember things about me?",
    "What do you know about me?",
    "Which city was I born in?",
    "What is my job?",
)

# (question, a string the right answer contains); held out from ANCHOR_PROMPTS
PROBE: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of England?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing"),
    ("What is 2 + 2?", "4"),
    ("What is 10 times 10?", "100"),
    ("What is 3 + 5?", "8"),
    ("How many days are in a week?", "7"),
    ("How many hours are in a day?", "24"),
    ("How many sides does a triangle have?", "3"),
    ("What is the chemical symbol for water?", "H2O"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What color is grass?", "green"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("Who painted the Mona Lisa?", "Leonardo"),
    ("Who wrote Hamlet?", "Shakespeare"),
    ("What is the closest star to Earth?", "Sun"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What is the largest mammal?", "whale"),
    ("What is the main language spoken in the United States?", "English"),
    ("How many wheels does a bicycle have?", "2"),
    ("What is the first letter of the English alphabet?", "A"),
    ("What do we call a baby dog?", "puppy"),
    ("What is the largest country by area?", "Russia"),
    ("What is the chemical symbol for oxygen?", "O"),
    ("What is the square root of 9?", "3"),
)
