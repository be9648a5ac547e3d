"""A RULER subset (Hsieh et al., 2024: "RULER: What's the Real Context Size of Your Long-Context Language
Models?"), generated offline for any Hugging Face tokenizer that has a chat template.

Nine tasks, following the formats of RULER's synthetic task definitions:

=================  ==========  =========  ========  ==============================================
task               haystack    keys       values    needles
=================  ==========  =========  ========  ==============================================
niah_single_1      noise       words      numbers   1
niah_single_2      essay       words      numbers   1
niah_single_3      essay       words      uuids     1
niah_multikey_1    essay       words      numbers   4 keys, one queried
niah_multikey_2    needle      words      numbers   1, among a haystack of distractor needles
niah_multikey_3    needle      uuids      uuids     1, among a haystack of distractor needles
niah_multivalue    essay       words      numbers   4 values of the one queried key (all answers)
niah_multiquery    essay       words      numbers   4 keys, all queried (4 answers)
vt                 noise       -          -         1 chain of 4 hops: VAR A = 12345, VAR B = VAR A, ...
=================  ==========  =========  ========  ==============================================

* noise haystack: "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
  repeated, one repetition a line (the last one may stop early, at a sentence end); needles are whole lines.
* essay haystack: Paul Graham essays from ``shared/data/paul-graham-essays/*.txt`` (no other source), whitespace
  collapsed, starting at the beginning of an essay chosen per sample and running on into the next ones; it ends
  at a word boundary (as in RULER, the last sentence may be cut); needles go in at sentence boundaries.
* needle haystack: every line is a distractor needle, "One of the special magic numbers for <key> is: <value>.",
  whose keys differ from the real keys and whose values differ from the answers.
* Keys are adjective-noun pairs from a small fixed word list ("amber-anchor"; RULER draws them from wonderwords)
  or UUIDs; values are 7-digit numbers or UUIDs; vt variables are 5 random capital letters and its value has 5
  digits, as in RULER.
* Depths: needles sit at the sentence (line) boundary nearest to a depth drawn from RULER's grid of 40 depths
  over 0-100 %. Single-needle tasks walk a seeded permutation of the grid over the samples, so any 40
  consecutive samples cover every depth once; multi-needle tasks draw distinct depths per sample. The depth
  recorded is the fraction of haystack tokens before the needle.

Each sample comes in two prompt forms, both fitted to the requested token length (chat template, instruction and
question included) within +-2 % (in practice within three tokens):

* query-agnostic: ``context_ids`` (chat template up to the end of the haystack: system turn if any, the user
  turn's instruction and haystack) then ``question_ids`` (the question, the end of the user turn and the
  assistant header). ``context_ids + question_ids`` is exactly the tokenization of the one-turn chat prompt.
* query-aware: ``aware_ids``, the question stated before the haystack as well as after it, in the same chat
  template with the generation prompt.

The two forms share keys, values and requested depths; the aware form's haystack is shorter by about the length
of the extra question so that both hit the requested length (it starts at the same place; distractor lines of a
needle haystack may differ). Needle-haystack lines are coarse (a UUID line is 67-87 tokens), so after choosing how
many, a few lines get their key or value redrawn from a seeded pool for one of the token count that closes the gap:
at 512 tokens the UUID distractors of niah_multikey_3 lean towards letter-rich (shorter) UUIDs. Word keys allow
about 2,400 distractor lines (~50k tokens). Scoring is RULER's string match: ``score(sample, text)`` is the fraction of
answers found in the text, case-insensitive ("all"; ``mode="part"`` gives 1.0 if any is found).

Every answer string occurs exactly once in each prompt (decoded text, case-insensitive), except in vt, where each
variable is assigned exactly once but the first four also appear once more, on the right of the next hop.
"""
from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # the same folder as pyrajax.eval.DATA
ESSAYS_DIR = DATA / "paul-graham-essays"

RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt")


@dataclass(frozen=True)
class _Niah:
    haystack: str  # "noise" | "essay" | "needle"
    key: str  # "words" | "uuids"
    value: str  # "numbers" | "uuids"
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


NIAH = {
    "niah_single_1": _Niah("noise", "words", "numbers"),
    "niah_single_2": _Niah("essay", "words", "numbers"),
    "niah_single_3": _Niah("essay", "words", "uuids"),
    "niah_multikey_1": _Niah("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": _Niah("needle", "words", "numbers"),
    "niah_multikey_3": _Niah("needle", "uuids", "uuids"),
    "niah_multivalue": _Niah("essay", "words", "numbers", num_v=4),
    "niah_multiquery": _Niah("essay", "words", "numbers", num_k=4, num_q=4),
}
VT_HOPS = 4
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30}  # RULER's generation budgets

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40)))  # RULER's depth grid, in percent
TOLERANCE = 0.02

# Keys: adjective-noun pairs (2,500). No adjective ends another and no noun starts another, so one key is never a
# substring of a different key.
ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "crimson", "curious", "dusty",
    "eager", "electric", "fancy", "fierce", "frozen", "gentle", "golden", "grumpy", "hollow", "humble",
    "icy", "jolly", "kind", "lazy", "lively", "lucky", "misty", "modern", "nimble", "noisy",
    "olive", "orange", "patient", "polite", "purple", "quiet", "rapid", "rusty", "salty", "shiny",
    "silent", "silver", "sleepy", "smooth", "steady", "sunny", "tidy", "velvet", "wild", "witty",
)
NOUNS = (
    "anchor", "badger", "banjo", "basket", "beacon", "bicycle", "blanket", "bottle", "bridge", "cactus",
    "candle", "canyon", "carpet", "castle", "comet", "cookie", "dolphin", "engine", "falcon", "feather",
    "forest", "garden", "glacier", "hammer", "harbor", "helmet", "island", "jacket", "kettle", "ladder",
    "lantern", "lemon", "meadow", "mirror", "monkey", "needle", "orchard", "otter", "pebble", "pencil",
    "piano", "pillow", "rabbit", "river", "saddle", "tiger", "tunnel", "violin", "walrus", "window",
)
KEYS = tuple(f"{a}-{n}" for a in ADJECTIVES for n in NOUNS)

_SENT = "\x00<ruler-question>\x00"  # marks the split between context and question in the rendered template


# ---------------------------------------------------------------------------------------------------------
# Tokenizer helpers

def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of already templated texts, as apply_chat_template(tokenize=True) makes them (no extra special
    tokens). A fast tokenizer's backend is called directly (encode_batch_fast: no offsets, a third quicker)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _encode(tokenizer, text: str) -> list[int]:
    return _encode_batch(tokenizer, [text])[0]


def _encode_many(tokenizer, texts: list[str]) -> list[int]:
    """Token counts."""
    return [len(ids) for ids in _encode_batch(tokenizer, texts)]


def _render(tokenizer, content: str, system: str | None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_CACHE: dict = {}


def _cached(kind: str, tokenizer, extra, build: Callable):
    """Per-tokenizer data (the tokenizer is kept alive with it, so its id cannot be reused)."""
    key = (kind, id(tokenizer), extra)
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not tokenizer:
        hit = _CACHE[key] = (tokenizer, build())
    return hit[1]


# ---------------------------------------------------------------------------------------------------------
# Haystacks: a stream of units, each a string that starts with its one-character separator, with a token count
# (the units' counts add up to the haystack's tokens; the fit checks the real count) and whether a needle may be
# inserted before it (a sentence / line boundary).

@dataclass
class _Corpus:
    words: list[str]  # " word"
    counts: np.ndarray
    sentence_end: np.ndarray  # the word ends a sentence
    essay_starts: np.ndarray


def _essay_corpus(tokenizer, essays_dir: Path) -> _Corpus:
    def build():
        files = sorted(Path(essays_dir).glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no *.txt essays in {essays_dir}")
        words, starts = [], []
        for f in files:
            starts.append(len(words))
            words += re.sub(r"\s+", " ", f.read_text(encoding="utf-8", errors="replace")).strip().split(" ")
        unique = sorted(set(words))
        count = dict(zip(unique, _encode_many(tokenizer, [" " + w for w in unique])))
        end = re.compile(r"[.!?][\"')\]]*$")
        return _Corpus([" " + w for w in words], np.array([count[w] for w in words], dtype=np.int64),
                       np.array([bool(end.search(w)) for w in words]), np.array(starts, dtype=np.int64))
    return _cached("essays", tokenizer, str(Path(essays_dir).resolve()), build)


@dataclass
class _Stream:
    texts: list[str]
    counts: np.ndarray
    bound: np.ndarray  # bound[k]: a needle may go before unit k (bound[0] is True; the end always is)
    needle_sep: str

    def __post_init__(self):
        self.cum = np.concatenate([[0], np.cumsum(self.counts)])

    def positions(self, n: int, depths: list[float]) -> tuple[list[int], list[float]]:
        """The boundary nearest to each depth (a fraction of the first n units' tokens) and the depth reached."""
        allowed = np.flatnonzero(self.bound[:n + 1])
        if allowed[-1] != n:
            allowed = np.append(allowed, n)
        at = self.cum[allowed]
        total = self.cum[n]
        out, got = [], []
        for d in depths:
            j = int(np.searchsorted(at, d * total))
            cand = [c for c in (j - 1, j) if 0 <= c < len(at)]
            b = int(allowed[min(cand, key=lambda c: abs(at[c] - d * total))])
            out.append(b)
            got.append(float(self.cum[b] / total) if total else 0.0)
        return out, got

    def haystack(self, n: int, needles: list[str], depths: list[float]) -> tuple[str, list[float]]:
        """The first n units with the needles (in order; depths ascending) inserted; and the depths reached."""
        pos, got = self.positions(n, depths)
        parts, prev = [], 0
        for b, needle in zip(pos, needles):
            parts.append("".join(self.texts[prev:b]))
            parts.append(self.needle_sep + needle)
            prev = b
        parts.append("".join(self.texts[prev:n]))
        return "".join(parts)[1:], got  # [1:]: the first piece's separator


def _essay_stream(tokenizer, essays_dir, rng: random.Random, length: int) -> _Stream:
    c = _essay_corpus(tokenizer, essays_dir)
    start = int(c.essay_starts[rng.randrange(len(c.essay_starts))])
    idx = (start + np.arange(length + 64)) % len(c.words)  # every word is at least one token: long enough
    bound = np.concatenate([[True], c.sentence_end[idx[:-1]], [True]])
    return _Stream([c.words[i] for i in idx], c.counts[idx], bound, " ")


def _noise_stream(tokenizer, length: int) -> _Stream:
    counts = _cached("noise", tokenizer, None, lambda: (_encode_many(tokenizer, ["\n" + s for s in NOISE]),
                                                        _encode_many(tokenizer, [" " + s for s in NOISE])))
    n = length // 4 + 16  # sentences have at least four tokens
    texts = [("\n" if i % 5 == 0 else " ") + NOISE[i % 5] for i in range(n)]
    cnt = np.array([counts[0 if i % 5 == 0 else 1][i % 5] for i in range(n)], dtype=np.int64)
    bound = np.array([i % 5 == 0 for i in range(n)] + [True])
    return _Stream(texts, cnt, bound, "\n")


# ---------------------------------------------------------------------------------------------------------
# Random keys and values

def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _draw(rng: random.Random, kind: str, taken: set[str]) -> str:
    while True:
        x = {"numbers": _number, "uuids": _uuid, "words": lambda r: r.choice(KEYS)}[kind](rng)
        if x not in taken:
            taken.add(x)
            return x


def _needle(kind_v: str, key: str, value: str) -> str:
    return f"One of the special magic {kind_v} for {key} is: {value}."


@dataclass
class _Pool:
    """Seeded keys or values with their token counts (as " x"), indexed by count."""
    items: list[str]
    counts: np.ndarray
    by_count: dict[int, np.ndarray]
    index: dict[str, int]

    @classmethod
    def of(cls, tokenizer, items: list[str]) -> "_Pool":
        counts = np.array(_encode_many(tokenizer, [" " + x for x in items]), dtype=np.int64)
        return cls(items, counts, {int(c): np.flatnonzero(counts == c) for c in np.unique(counts)},
                   {x: i for i, x in enumerate(items)})


def _pools(tokenizer, spec: _Niah) -> tuple[_Pool, _Pool, int]:
    """Key pool, value pool and the tokens of a distractor line besides its key and value."""
    def build():
        rng = random.Random("ruler-distractor-pool")
        pool = {"words": lambda: list(KEYS),
                "uuids": lambda: sorted({_uuid(rng) for _ in range(4096)}),
                "numbers": lambda: sorted({_number(rng) for _ in range(4096)})}
        keys, values = _Pool.of(tokenizer, pool[spec.key]()), _Pool.of(tokenizer, pool[spec.value]())
        line = _encode_many(tokenizer, ["\n" + _needle(spec.value, keys.items[0], values.items[0])])[0]
        return keys, values, line - int(keys.counts[0]) - int(values.counts[0])
    return _cached("distractor-pools", tokenizer, (spec.key, spec.value), build)


class _LineStream(_Stream):
    """A needle haystack: distractor lines "One of the special magic ... for <key> is: <value>." with keys and
    values from seeded pools (never a real key or an answer, no key or value twice). The lines are coarse (a
    UUID line is 67-87 tokens), so `fit` picks how many and then redraws keys or values, one at a time, for
    ones of the token count that closes the gap to the budget; a later fit starts from the earlier lines."""

    def __init__(self, tokenizer, spec: _Niah, rng: random.Random, real_keys: set[str], real_values: set[str]):
        self.keys, self.values, self.base = _pools(tokenizer, spec)
        self.spec, self.rng = spec, rng
        self.bad = ({self.keys.index[x] for x in real_keys if x in self.keys.index},
                    {self.values.index[x] for x in real_values if x in self.values.index})
        self.lines: list[list[int]] = []  # [key index, value index]
        self.mean = self.base + float(self.keys.counts.mean()) + float(self.values.counts.mean())
        super().__init__([], np.zeros(0, dtype=np.int64), np.ones(1, dtype=bool), "\n")

    def _pick(self, slot: int, used: set[int], count: int | None = None) -> int:
        """A random free key (slot 0) or value (1) index; with `count`, one of the nearest token count free."""
        pool = (self.keys, self.values)[slot]
        if count is None:
            buckets = [np.arange(len(pool.items))]
        else:
            buckets = [pool.by_count[c] for c in sorted(pool.by_count, key=lambda c: (abs(c - count), c))]
        for cand in buckets:
            for _ in range(16):
                i = int(cand[self.rng.randrange(len(cand))])
                if i not in used and i not in self.bad[slot]:
                    return i
            free = [int(i) for i in cand if int(i) not in used and int(i) not in self.bad[slot]]
            if free:
                return free[self.rng.randrange(len(free))]
        raise RuntimeError("distractor pool exhausted")

    def _count(self, line) -> int:
        return self.base + int(self.keys.counts[line[0]]) + int(self.values.counts[line[1]])

    def fit(self, budget: int) -> int:
        """Lines totalling `budget` tokens (or as near as reachable); returns how many."""
        hint = max(0, int(round(budget / self.mean)))
        best = None
        for n in (hint, hint - 1, hint + 1):
            if n < 0:
                continue
            lines = [list(x) for x in self.lines[:n]]
            used = [{x[0] for x in lines}, {x[1] for x in lines}]
            while len(lines) < n:
                line = [self._pick(0, used[0]), self._pick(1, used[1])]
                used[0].add(line[0])
                used[1].add(line[1])
                lines.append(line)
            diff = budget - sum(self._count(x) for x in lines)
            for it in range(4 * n):
                if diff == 0:
                    break
                j, slot = it % n, (it // n + 1) % 2  # values first, then keys
                pool = (self.keys, self.values)[slot]
                old = lines[j][slot]
                used[slot].discard(old)
                new = self._pick(slot, used[slot], int(pool.counts[old]) + diff)
                used[slot].add(new)
                lines[j][slot] = new
                diff -= int(pool.counts[new]) - int(pool.counts[old])
            if best is None or abs(diff) < abs(best[0]):
                best = (diff, n, lines)
            if diff == 0:
                break
        _, n, lines = best
        self.lines = lines + [x for x in self.lines[n:] if x[0] not in {y[0] for y in lines}
                              and x[1] not in {y[1] for y in lines}]
        self.texts = ["\n" + _needle(self.spec.value, self.keys.items[k], self.values.items[v]) for k, v in self.lines]
        self.counts = np.array([self._count(x) for x in self.lines], dtype=np.int64)
        self.bound = np.ones(len(self.lines) + 1, dtype=bool)
        self.cum = np.concatenate([[0], np.cumsum(self.counts)])
        return n


def _join(items: list[str]) -> str:
    return ", ".join(items[:-1]) + ", and " + items[-1] if len(items) > 1 else items[0]


# ---------------------------------------------------------------------------------------------------------
# Samples

@dataclass
class _Draft:
    """One sample before fitting: needles in insertion order with ascending requested depths (fractions)."""
    stream: _Stream
    needles: list[str]
    depths: list[float]
    answers: list[str]
    answer_needle: list[int]  # the needle that holds each answer
    keys: list[str]
    query: str
    instruction: str
    question_pre: str  # the question as stated before the haystack (aware form)
    question: str
    gap: str  # between the instruction and the haystack
    answer_prefix: str
    family: str


def _single_depth(task: str, length: int, seed: int, index: int) -> float:
    perm = random.Random(f"ruler-depths|{task}|{length}|{seed}|{index // len(DEPTHS)}").sample(DEPTHS, len(DEPTHS))
    return perm[index % len(DEPTHS)] / 100


def _draft_niah(task, tokenizer, length, rng, essays_dir, depth0) -> _Draft:
    spec = NIAH[task]
    taken_k, taken_v = set(), set()
    keys = [_draw(rng, spec.key, taken_k) for _ in range(max(spec.num_k, spec.num_q))]
    values = [[_draw(rng, spec.value, taken_v) for _ in range(spec.num_v)] for _ in keys]
    needles = [(_needle(spec.value, k, v), i) for i, k in enumerate(keys) for v in values[i]]
    rng.shuffle(needles)
    if len(needles) == 1:
        depths = [depth0]
    else:
        depths = sorted(d / 100 for d in rng.sample(DEPTHS, len(needles)))
    queried = rng.sample(range(len(keys)), spec.num_q)
    answers, answer_needle = [], []
    for qi in queried:
        for v in values[qi]:
            answers.append(v)
            answer_needle.append(next(j for j, (t, _) in enumerate(needles) if t.endswith(f" {v}.")))
    query = _join([keys[i] for i in queried])
    if spec.haystack == "essay":
        stream = _essay_stream(tokenizer, essays_dir, rng, length)
    elif spec.haystack == "noise":
        stream = _noise_stream(tokenizer, length)
    else:
        stream = _LineStream(tokenizer, spec, rng, set(keys), {v for vs in values for v in vs})
    kinds = spec.value
    if spec.num_v * spec.num_q > 1:
        instruction = (f"Some special magic {kinds} are hidden within the following text. Make sure to memorize "
                       f"it. I will quiz you about the {kinds} afterwards.")
        question = f"What are all the special magic {kinds} for {query} mentioned in the provided text?"
        prefix = f"The special magic {kinds} for {query} mentioned in the provided text are"
    else:
        kind = kinds[:-1]
        instruction = (f"A special magic {kind} is hidden within the following text. Make sure to memorize it. "
                       f"I will quiz you about the {kind} afterwards.")
        question = f"What is the special magic {kind} for {query} mentioned in the provided text?"
        prefix = f"The special magic {kind} for {query} mentioned in the provided text is"
    return _Draft(stream, [t for t, _ in needles], depths, answers, answer_needle, [keys[i] for i in queried], query,
                  instruction, question, question, "\n", prefix, "niah")


def _draft_vt(tokenizer, length, rng) -> _Draft:
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))
        if name not in names:
            names.append(name)
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(VT_HOPS)]
    depths = sorted(d / 100 for d in rng.sample(DEPTHS, len(chain)))
    return _Draft(_noise_stream(tokenizer, length), chain, depths, names, list(range(len(chain))), [value], value,
                  "Memorize and track the chain(s) of variable assignment hidden in the following text.",
                  f"Question: Find all variables that are assigned the value {value} in the text below.",
                  f"Question: Find all variables that are assigned the value {value} in the text above.",
                  "\n\n",
                  f"Answer: According to the chain(s) of variable assignment in the text above, {len(chain)} "
                  f"variables are assigned the value {value}, they are:", "vt")


def _fit(tokenizer, d: _Draft, length: int, builds: list[Callable[[str], str]]) -> list[tuple]:
    """For each prompt form build(haystack), choose how many haystack units make it exactly `length` tokens (or
    as near as the units allow): [(error, token ids, rendered text, depths reached)], one per form. The forms
    are tokenized together, one batch a round (the tokenizer runs a batch in parallel). A form whose text holds
    the sentinel also gets the text before it tokenized in the same batch: (..., ids of that prefix)."""
    def texts_of(ns):
        out = []
        for build, n in zip(builds, ns):
            hay, got = d.stream.haystack(n, d.needles, d.depths)
            out.append((build(hay), got))
        return out

    def encode(texts):
        batch = [t.replace(_SENT, "") for t in texts] + [t.split(_SENT)[0] for t in texts if _SENT in t]
        return _encode_batch(tokenizer, batch)

    lines = isinstance(d.stream, _LineStream)
    zero = encode([t for t, _ in texts_of([0] * len(builds))])
    budgets = [length - len(ids) for ids in zero[:len(builds)]]
    slack = max(1, length // 400)  # good enough without another tokenization (0.25 %)
    best = [None] * len(builds)
    tried = [set() for _ in builds]
    todo = list(range(len(builds)))
    for _ in range(4):
        if not todo:
            break
        texts = []
        for i in todo:
            if lines:
                n = d.stream.fit(budgets[i])
            else:
                if d.stream.cum[-1] < budgets[i]:
                    raise ValueError(f"haystack stream too short for {length} tokens")
                n = int(np.argmin(np.abs(d.stream.cum - budgets[i])))
            texts.append((i, n, *texts_of([0] * i + [n])[i]))  # built now: a later fit redraws lines
        ids = encode([t for _, _, t, _ in texts])
        pre = iter(ids[len(texts):])
        left = []
        for (i, n, text, got), full in zip(texts, ids):
            entry = (len(full) - length, list(full), text, got) + ((list(next(pre)),) if _SENT in text else ())
            if best[i] is None or abs(entry[0]) < abs(best[i][0]):
                best[i] = entry
            repeated = not lines and n in tried[i]  # the unit count came back: as near as it gets
            if abs(entry[0]) > slack and not repeated:
                left.append(i)
                budgets[i] -= entry[0]
            tried[i].add(n)
        todo = left
    return best


def _split(tokenizer, text: str, full: list[int], ctx: list[int]) -> tuple[list[int], list[int]]:
    """context and question ids of a rendered prompt holding one sentinel, such that their concatenation is
    `full`, the tokenization of the whole prompt; `ctx`: the tokenization of the text before the sentinel. (The
    split moves over the separating newline if a merge crosses it.)"""
    pre, post = text.split(_SENT)
    if full[:len(ctx)] == ctx and _encode(tokenizer, post) == full[len(ctx):]:
        return ctx, full[len(ctx):]
    for a, b in ((pre + post[:1], post[1:]), (pre[:-1], pre[-1:] + post)):
        ctx, q = _encode(tokenizer, a), _encode(tokenizer, b)
        if ctx + q == full:
            return ctx, q
    raise ValueError("cannot split the prompt between context and question on a token boundary")


def _valid(d: _Draft, texts: list[str], n_questions: list[int]) -> bool:
    """Each answer once (vt: each variable assigned once), the keys only in their needles (and the question),
    the vt value only in its first hop and the questions (n_questions: how often the value is stated)."""
    for text, nq in zip(texts, n_questions):
        low = text.lower()
        if d.family == "vt":
            last = len(d.answers) - 1
            if any(low.count(a.lower()) != (1 if i == last else 2) or text.count(f"VAR {a} =") != 1
                   for i, a in enumerate(d.answers)):
                return False
            if low.count(d.query) != 1 + nq:
                return False
        else:
            if any(low.count(a.lower()) != 1 for a in d.answers):
                return False
            if any(low.count(f"for {k.lower()} is:") != sum(f"for {k} is:" in n for n in d.needles) for k in d.keys):
                return False
    return True


def _sample(tokenizer, task, length, seed, index, essays_dir, system, answer_prefix) -> dict:
    tol = int(TOLERANCE * length)
    last = None
    for attempt in range(32):
        rng = random.Random(f"ruler|{task}|{length}|{seed}|{index}|{attempt}")
        if task == "vt":
            d = _draft_vt(tokenizer, length, rng)
        else:
            d = _draft_niah(task, tokenizer, length, rng, essays_dir, _single_depth(task, length, seed, index))
        tail = d.answer_prefix if answer_prefix else ""

        def agnostic(hay):
            return _render(tokenizer, f"{d.instruction}{d.gap}{hay}{_SENT}\n{d.question}", system) + tail

        def aware(hay):
            return _render(tokenizer, f"{d.instruction}\n{d.question_pre}{d.gap}{hay}\n{d.question}", system) + tail

        (err_c, full_c, text_c, depth_c, pre_c), (err_a, aware_ids, text_a, depth_a) = \
            _fit(tokenizer, d, length, [agnostic, aware])
        last = (err_c, err_a)
        if max(abs(err_c), abs(err_a)) > (min(3, tol) if attempt < 4 else tol):  # a few draws for a close fit
            continue
        if not _valid(d, [text_c.replace(_SENT, ""), text_a], [1 + bool(tail), 2 + bool(tail)]):
            continue
        context_ids, question_ids = _split(tokenizer, text_c, full_c, pre_c)
        return dict(
            task=task, length=length, seed=seed, index=index, family=d.family,
            context_ids=context_ids, question_ids=question_ids, aware_ids=aware_ids,
            answers=list(d.answers), n_tokens=len(aware_ids), n_agnostic_tokens=len(context_ids) + len(question_ids),
            depths=[depth_a[j] for j in d.answer_needle],  # per answer, in the aware prompt
            context_depths=[depth_c[j] for j in d.answer_needle],  # per answer, in context_ids
            requested_depths=[d.depths[j] for j in d.answer_needle],
            needle_depths=depth_a, num_needles=len(d.needles),
            query=d.query, keys=list(d.keys), question=d.question,
            answer_prefix=d.answer_prefix, answer_prefix_in_prompt=bool(answer_prefix),
            metric="all", max_new_tokens=TOKENS_TO_GENERATE[d.family])
    raise RuntimeError(f"{task} at {length} tokens, sample {index}: no valid prompt within +-{tol} tokens after "
                       f"32 attempts (last errors {last})")


def ruler_samples(tokenizer, task: str, length: int, n: int, seed: int = 0, essays_dir=ESSAYS_DIR,
                  system: str | None = None, answer_prefix: bool = False) -> list[dict]:
    """`n` samples of RULER task `task` (one of RULER_TASKS) at `length` prompt tokens, deterministic in `seed`
    (sample i does not depend on n: the first k of n samples are the k samples).

    Each sample: task, length, seed, index, family ("niah" | "vt"); context_ids, question_ids (query-agnostic
    form: context_ids + question_ids is the one-turn chat prompt, question at the end), aware_ids (query-aware
    form: question before and after the haystack); answers (all expected in the output), n_tokens
    (len(aware_ids)), n_agnostic_tokens; depths / context_depths (per answer, fraction of haystack tokens before
    its needle in the aware / agnostic prompt), requested_depths, needle_depths (every needle, aware prompt),
    num_needles; query, keys, question; answer_prefix (RULER's answer prefix text, appended after the
    assistant header of both forms when answer_prefix=True) and answer_prefix_in_prompt; metric ("all") and
    max_new_tokens (RULER's generation budget: 128 for niah, 30 for vt).

    `system`: an optional system prompt (none by default; the chat template may add its own default one, as
    SmolLM2's does). `essays_dir`: the Paul Graham essays (*.txt) for the essay haystacks."""
    if task not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(RULER_TASKS)}")
    if length < 128:
        raise ValueError(f"length {length} is too short for a RULER prompt")
    return [_sample(tokenizer, task, int(length), seed, i, Path(essays_dir), system, answer_prefix) for i in range(n)]


def score(sample: dict, text: str, mode: str | None = None) -> float:
    """RULER's string match on one output: "all" (the sample's default) = fraction of the answers that occur in
    `text`; "part" = 1.0 if any does. Case-insensitive."""
    mode = mode or sample.get("metric", "all")
    hits = [a.lower() in text.lower() for a in sample["answers"]]
    if mode == "all":
        return sum(hits) / len(hits)
    if mode == "part":
        return float(any(hits))
    raise ValueError(f"unknown score mode {mode!r}; use 'all' or 'part'")
