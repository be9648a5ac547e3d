"""The offline task generators (pyrajax.tasks): RULER subset prompts and the chat regression set, checked with the
real SmolLM2 tokenizer on CPU."""
from __future__ import annotations

import re

import pytest

from pyrajax.tasks import CHAT_SYSTEM, RULER_TASKS, chat_prompt_ids, chat_prompts, ruler_samples, score
from pyrajax.tasks import ruler

LENGTHS = (512, 1024)
N = 5

pytestmark = pytest.mark.skipif(not any(ruler.ESSAYS_DIR.glob("*.txt")),
                                reason=f"no Paul Graham essays in {ruler.ESSAYS_DIR} (the shared data folder)")


@pytest.fixture(scope="session")
def tok(smol_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smol_dir / "tokenizer"))


_SAMPLES: dict = {}


def samples(tok, task, length, n=N, seed=0):
    key = (task, length, n, seed)
    if key not in _SAMPLES:
        _SAMPLES[key] = ruler_samples(tok, task, length, n, seed=seed)
    return _SAMPLES[key]


def chat_ids(tok, content, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


USER = "<|im_start|>user\n"
END = "<|im_end|>\n<|im_start|>assistant\n"


def user_content(text: str) -> str:
    """The user turn of a decoded SmolLM2 one-turn prompt."""
    assert text.count(USER) == 1 and text.endswith(END), text[-200:]
    return text[text.index(USER) + len(USER):-len(END)]


def check_sample(tok, s, task, length):
    tol = 0.02 * length
    assert s["task"] == task and s["length"] == length
    aware, ctx, q = s["aware_ids"], s["context_ids"], s["question_ids"]
    assert s["n_tokens"] == len(aware) and s["n_agnostic_tokens"] == len(ctx) + len(q)
    assert abs(len(aware) - length) <= tol, (task, length, len(aware))
    assert abs(len(ctx) + len(q) - length) <= tol, (task, length, len(ctx) + len(q))

    # context + question is exactly the one-turn chat prompt, and each half is its own tokenization
    agnostic_text = tok.decode(ctx + q)
    content = user_content(agnostic_text)
    assert chat_ids(tok, content) == ctx + q
    ctx_text, q_text = tok.decode(ctx), tok.decode(q)
    assert tok(ctx_text, add_special_tokens=False)["input_ids"] == ctx
    assert tok(q_text, add_special_tokens=False)["input_ids"] == q
    assert q_text.endswith(END) and s["question"] in q_text and s["question"] not in ctx_text
    aware_text = tok.decode(aware)
    assert chat_ids(tok, user_content(aware_text)) == aware
    assert aware_text.endswith(s["question"] + END)  # and stated before the haystack (vt: "in the text below")
    assert aware_text.count(s["question"]) == (1 if task == "vt" else 2)
    if task == "vt":
        assert aware_text.count(s["question"].replace("text above", "text below")) == 1
    assert aware_text.index(s["query"]) < aware_text.index(s["answers"][0]), "the question comes before the haystack"

    answers = s["answers"]
    assert len(answers) == {"niah_multivalue": 4, "niah_multiquery": 4, "vt": 5}.get(task, 1)
    assert len(set(answers)) == len(answers)
    for text in (aware_text, agnostic_text, ctx_text):
        low = text.lower()
        for i, a in enumerate(answers):
            if task == "vt":  # assigned once; the first four are also the right side of the next hop
                assert text.count(f"VAR {a} =") == 1
                assert low.count(a.lower()) == (1 if i == len(answers) - 1 else 2)
            else:
                assert low.count(a.lower()) == 1, (task, a)
    if task != "vt":
        kind = "uuids" if task in ("niah_single_3", "niah_multikey_3") else "numbers"
        values = re.findall(r"One of the special magic " + kind + r" for (\S+) is: (\S+)\.", ctx_text)
        want = {"niah_multikey_1": 4, "niah_multivalue": 4, "niah_multiquery": 4}.get(task, 1)
        if task in ("niah_multikey_2", "niah_multikey_3"):
            assert len(values) > want  # the haystack is made of distractor needles
            lines = ctx_text.split(USER)[1].split("\n")[1:]  # every line after the instruction is a needle
            assert len(lines) == len(values) and all(x.startswith("One of the special magic") for x in lines)
        else:
            assert len(values) == want
        assert len({k for k, _ in values}) == len(values) - (3 if task == "niah_multivalue" else 0)
        assert all(a in {v for _, v in values} for a in answers)
        fmt = r"\d{7}" if kind == "numbers" else r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
        assert all(re.fullmatch(fmt, v) for _, v in values)
        for k in s["keys"]:
            assert ctx_text.count(f"for {k} is:") == (4 if task == "niah_multivalue" else 1)
    else:
        assert re.fullmatch(r"\d{5}", s["query"]) and all(re.fullmatch(r"[A-Z]{5}", a) for a in answers)
        assert "The grass is green. The sky is blue." in ctx_text
    assert len(s["depths"]) == len(s["context_depths"]) == len(s["requested_depths"]) == len(answers)
    assert all(0 <= d <= 1 for d in s["depths"] + s["context_depths"] + s["needle_depths"])
    assert all(abs(a - b) < 0.15 for a, b in zip(s["context_depths"], s["requested_depths"]))


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", RULER_TASKS)
def test_ruler_samples(tok, task, length):
    out = samples(tok, task, length)
    assert len(out) == N
    for s in out:
        check_sample(tok, s, task, length)
    assert len({tuple(s["aware_ids"]) for s in out}) == N


@pytest.mark.parametrize("task", RULER_TASKS)
def test_ruler_samples_4096(tok, task):
    for s in samples(tok, task, 4096, n=2):
        check_sample(tok, s, task, 4096)


def test_ruler_task_list():
    assert RULER_TASKS == ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                           "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt")
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler_samples(None, "qa_1", 512, 1)


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_3", "vt"])
def test_ruler_deterministic(tok, task):
    a = ruler_samples(tok, task, 512, 3, seed=0)
    assert a == ruler_samples(tok, task, 512, 3, seed=0)
    assert a == samples(tok, task, 512)[:3]  # sample i does not depend on n
    b = ruler_samples(tok, task, 512, 3, seed=1)
    assert all(x["aware_ids"] != y["aware_ids"] and x["answers"] != y["answers"] for x, y in zip(a, b))


def test_ruler_depths_spread(tok):
    depths = [s["requested_depths"][0] for s in ruler_samples(tok, "niah_single_1", 512, 40)]
    assert sorted(round(100 * d) for d in depths) == sorted(ruler.DEPTHS)  # 40 samples cover the depth grid


def test_ruler_options(tok):
    s = ruler_samples(tok, "niah_multivalue", 512, 1, system="You are a careful reader.", answer_prefix=True)[0]
    check_sample_len = abs(s["n_tokens"] - 512) <= 10 and abs(s["n_agnostic_tokens"] - 512) <= 10
    assert check_sample_len
    text = tok.decode(s["aware_ids"])
    assert text.startswith("<|im_start|>system\nYou are a careful reader.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n" + s["answer_prefix"]) and s["answer_prefix_in_prompt"]
    assert tok.decode(s["question_ids"]).endswith(s["answer_prefix"])
    assert all(tok.decode(s["aware_ids"]).count(a) == 1 for a in s["answers"])


def test_score():
    s = {"answers": ["1234567", "7654321", "ABCDE"], "metric": "all"}
    assert score(s, "The numbers are 1234567, 7654321 and abcde.") == 1.0
    assert score(s, "1234567 and 7654321") == pytest.approx(2 / 3)
    assert score(s, "I do not know.") == 0.0
    assert score(s, "1234567", mode="part") == 1.0 and score(s, "nothing", mode="part") == 0.0
    one = {"answers": ["f81d4fae-7dec-41d0-a765-00a0c91e6bf6"]}
    assert score(one, "It is F81D4FAE-7DEC-41D0-A765-00A0C91E6BF6.") == 1.0
    assert score(one, "It is f81d4fae-7dec-41d0-a765.") < 1.0
    with pytest.raises(ValueError):
        score(one, "", mode="any")


def test_score_on_samples(tok):
    for task in RULER_TASKS:
        s = samples(tok, task, 512)[0]
        assert score(s, " ".join(s["answers"])) == 1.0
        assert score(s, " ".join(s["answers"][1:])) < 1.0


def test_key_words():
    keys = ruler.KEYS
    assert len(set(keys)) == len(keys) == len(ruler.ADJECTIVES) * len(ruler.NOUNS)
    assert not any(a != b and b.endswith(a) for a in ruler.ADJECTIVES for b in ruler.ADJECTIVES)
    assert not any(a != b and b.startswith(a) for a in ruler.NOUNS for b in ruler.NOUNS)


def test_chat_prompts(tok):
    convs = chat_prompts()
    assert len(convs) >= 30
    users = [c[1]["content"] for c in convs]
    assert len(set(users)) == len(users)
    for c in convs:
        assert [m["role"] for m in c] == ["system", "user"] and c[0]["content"] == CHAT_SYSTEM
        text = tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        assert CHAT_SYSTEM in text and c[1]["content"] in text and text.endswith(END)
    ids = chat_prompt_ids(tok)
    assert len(ids) == len(convs) and all(len(x) < 80 for x in ids)
    assert all(chat_ids(tok, c[1]["content"], CHAT_SYSTEM) == x for c, x in zip(convs, ids))
    convs[0][1]["content"] = "changed"
    assert chat_prompts()[0][1]["content"] != "changed"  # a fresh copy each call
