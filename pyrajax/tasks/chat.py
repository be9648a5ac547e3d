"""A chat regression set: short one-turn conversations answered greedily under each cache policy and compared
for exact match with the full cache's answer. Each conversation is [system, user]; all of them are well under
80 tokens in SmolLM2's chat template."""
from __future__ import annotations

CHAT_SYSTEM = "You are a concise assistant. Answer in one short sentence."

_USER = (
    # facts
    "What is the capital of France?",
    "What is the capital of Japan?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "What is the chemical symbol for gold?",
    "How many days are there in a week?",
    "What language is mainly spoken in Brazil?",
    "What is the boiling point of water in degrees Celsius at sea level?",
    "Which animal is known as the king of the jungle?",
    "What gas do plants absorb from the air?",
    # instructions
    "Reply with only the word yes.",
    "Say hello in exactly two words.",
    "Repeat this sentence exactly: The cat sat on the mat.",
    "Write the word banana in capital letters.",
    "Answer with a single number: how many legs does a spider have?",
    # formats
    "List three primary colours separated by commas.",
    "Name the four seasons, separated by commas.",
    "Give me the days of the weekend as a comma-separated list.",
    "Write the numbers one to five as digits separated by spaces.",
    "Spell the word cat backwards.",
    # arithmetic
    "What is 7 plus 5?",
    "What is 12 times 3?",
    "What is 100 minus 37?",
    "What is half of 50?",
    "If I have 3 apples and eat one, how many are left?",
    # translation
    "Translate 'good morning' into French.",
    "Translate 'thank you' into Spanish.",
    "What is the German word for 'house'?",
    "Translate 'cat' into Italian.",
    # definitions and reasoning
    "What is the opposite of hot?",
    "Give a synonym for happy.",
    "Which is heavier, a kilogram of iron or a kilogram of feathers?",
    "What comes next in the sequence 2, 4, 6, 8?",
    "Is the sun a star or a planet?",
    "What colour do you get by mixing blue and yellow?",
    "Describe the moon in one sentence.",
)


def chat_prompts(system: str = CHAT_SYSTEM) -> list[list[dict]]:
    """The conversations, each [{"role": "system", ...}, {"role": "user", ...}] (a fresh copy each call)."""
    return [[{"role": "system", "content": system}, {"role": "user", "content": u}] for u in _USER]


def chat_prompt_ids(tokenizer, system: str = CHAT_SYSTEM) -> list[list[int]]:
    """The conversations as token ids: the tokenizer's chat template with the generation prompt."""
    return [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
            for c in chat_prompts(system)]
