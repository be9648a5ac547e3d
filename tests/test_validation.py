"""Bad input at the API boundary (pyrajax.validate): property-based with hypothesis, plus the cases the
hardening issue reported. Every call either succeeds with the documented result, its input unchanged, or raises
ValueError naming the argument; never another exception."""
from __future__ import annotations

import ast
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pyrajax
from pyrajax import cache as kvc
from pyrajax.cache import FAMILIES, PyramidConfig, cache_preset
from pyrajax.config import ModelConfig
from pyrajax.generate import GenerationConfig, extend, generate, logits, prefill

# Small enough that every prompt bucket (16, 32) and batch bucket (1, 2, 4) compiles in seconds.
CFG = ModelConfig(vocab_size=64, dim=32, ffn_dim=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                  max_positions=32)
V, MAX = CFG.vocab_size, CFG.max_positions


def bounded(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def params():
    return pyrajax.random_params(jax.random.key(0), CFG)


def is_token(t) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)) and 0 <= t < V


def fails(call, *names) -> str | None:
    """Run `call`: None if it succeeded, else the ValueError's message, which must name one of `names`."""
    try:
        call()
    except ValueError as e:
        assert any(n in str(e) for n in names), f"{e!r} names none of {names}"
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------------------
# Prompts

token = st.one_of(
    st.integers(0, V - 1), st.integers(0, V - 1).map(np.int64),  # good
    st.integers(V, 2**40), st.integers(-2**40, -1),  # outside the vocabulary
    st.floats(allow_nan=True, allow_infinity=True), st.integers(0, V - 1).map(float),  # 2.0 is not a token id
    st.booleans(), st.none(), st.text(max_size=3), st.binary(max_size=3), st.lists(st.integers(0, V - 1), max_size=2))
ids = st.integers(0, V - 1)
good_ids = st.one_of(st.lists(ids, min_size=1, max_size=MAX // 2), st.lists(ids, min_size=MAX - 4, max_size=MAX + 1),
                     st.just([]))  # lengths 0 .. max + 1, most of them short
good_prompt = st.one_of(good_ids, good_ids.map(tuple), good_ids.map(lambda ids: np.array(ids, np.int32)))
bad_prompt = st.one_of(
    st.builds(lambda ids, j, t: ids[:j] + [t] + ids[j:], good_ids, st.integers(0, MAX), token),  # one odd item
    st.lists(token, min_size=1, max_size=MAX + 1),  # mixed types
    st.lists(st.floats(0, V - 1), min_size=1, max_size=4).map(np.array),  # a float array
    token,  # a bare item where a list is meant
    st.just([{"role": "user", "content": "hi"}]))  # a chat, but this model has no tokenizer


def replace(items: list, bad: dict) -> list:
    return [bad.get(i, p) for i, p in enumerate(items)]


good_prompts = st.one_of(st.lists(good_prompt, min_size=1, max_size=3), st.lists(good_prompt, min_size=1, max_size=3).map(tuple))
# A ragged batch with some prompts replaced by bad ones, or not a batch of prompts at all.
bad_prompts = st.one_of(st.builds(replace, st.lists(good_prompt, min_size=1, max_size=3),
                                  st.dictionaries(st.integers(0, 2), bad_prompt, min_size=1, max_size=2)),
                        st.just([]), good_ids, token)


def prompt_problem(p, max_new: int) -> str | None:
    """Why generate must refuse prompt `p` (None: it must not)."""
    if isinstance(p, np.ndarray):
        ok = p.ndim == 1 and np.issubdtype(p.dtype, np.integer) and all(map(is_token, p.tolist()))
    else:
        ok = isinstance(p, (list, tuple)) and all(map(is_token, p))
    if not ok:
        return "content"
    if len(p) == 0:
        return "empty"
    return "positions" if len(p) + max_new > MAX else None


@bounded(40)
@given(prompts=good_prompts, max_new=st.integers(1, 4))
def test_generate_ragged_prompts(params, prompts, max_new):
    check_generate(params, prompts, max_new)


@bounded(80)
@given(prompts=bad_prompts, max_new=st.integers(1, 4))
def test_generate_bad_prompts(params, prompts, max_new):
    check_generate(params, prompts, max_new)


def check_generate(params, prompts, max_new: int):
    """generate either refuses `prompts` naming the first bad prompt (or `prompts` itself), or returns
    `max_new` tokens for each prompt, read exactly as given."""
    g = GenerationConfig(model=CFG, max_new_tokens=max_new, stop_ids=())
    result = []
    message = fails(lambda: result.append(generate(params, prompts, g)), "prompt")
    as_list = isinstance(prompts, (list, tuple)) and len(prompts) > 0 and not all(map(count, prompts))
    problems = [prompt_problem(p, max_new) for p in prompts] if as_list else None
    event("refused" if message else "generated")
    if not as_list:
        assert message is not None and message.startswith("prompts ")
    elif any(problems):
        assert message is not None
        # prompts are checked in order (content first), lengths against the model's positions after all of them
        first = next((i for i, q in enumerate(problems) if q in ("content", "empty")), None)
        first = problems.index("positions") if first is None else first
        assert message.startswith(f"prompt {first} "), (problems, message)
    else:
        assert message is None
        r = result[0]
        assert r.stats["prompt_tokens"] == [len(p) for p in prompts]  # nothing cut, flattened or padded away
        assert [len(t) for t in r.tokens] == [max_new] * len(prompts) and r.texts is None
        assert all(is_token(t) for seq in r.tokens for t in seq)
        plain = generate(params, [[int(t) for t in p] for p in prompts], g)
        assert r.tokens == plain.tokens  # numpy ints and tuples mean exactly the same ids


# ---------------------------------------------------------------------------------------------------------
# Sampling settings

anything = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.floats(allow_nan=True, allow_infinity=True),
                     st.integers(-2**64, 2**64), st.lists(st.integers(0, 3), max_size=2))
good_settings = st.fixed_dictionaries(dict(
    temperature=st.one_of(st.floats(0, 4), st.integers(0, 3)),
    top_k=st.one_of(st.integers(0, V), st.integers(0, V).map(np.int32)),
    top_p=st.one_of(st.floats(0, 1, exclude_min=True), st.just(1)),
    seed=st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1).map(np.uint32)),
    max_new_tokens=st.one_of(st.integers(1, 64), st.integers(1, 9).map(np.int64)),
    stop_ids=st.one_of(st.none(), st.lists(st.integers(0, V - 1), max_size=3),
                       st.lists(st.integers(0, V - 1), max_size=3).map(tuple)),
))
near_misses = dict(  # per setting, values just outside what it accepts (besides `anything`)
    temperature=st.sampled_from([-0.1, -1, math.nan, math.inf, "0.7"]),
    top_k=st.sampled_from([V + 1, -1, 2**31, 2.0, True]),
    top_p=st.sampled_from([0, 0.0, -0.5, 1.0001, 2, math.nan]),
    seed=st.sampled_from([-1, 2**32, 2**63, 1.0, False, "7"]),
    max_new_tokens=st.sampled_from([0, -5, 4.0, True]),
    stop_ids=st.one_of(st.lists(token, min_size=1, max_size=3), st.sampled_from([2, (2**31,), (V,), ((1, 2),), "2"])),
)
bad_settings = st.dictionaries(st.sampled_from(sorted(near_misses)), anything, max_size=2)
missed_settings = st.one_of(*(st.fixed_dictionaries({k: v}) for k, v in near_misses.items()))


def real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def count(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def invalid_settings(s: dict) -> set[str]:
    stop = s["stop_ids"]
    ok = {
        "temperature": real(s["temperature"]) and s["temperature"] >= 0,
        "top_k": count(s["top_k"]) and 0 <= s["top_k"] <= V,
        "top_p": real(s["top_p"]) and 0 < s["top_p"] <= 1,
        "seed": count(s["seed"]) and 0 <= s["seed"] < 2**32,
        "max_new_tokens": count(s["max_new_tokens"]) and s["max_new_tokens"] >= 1,
        "stop_ids": stop is None or (isinstance(stop, (list, tuple)) and all(map(is_token, stop))),
    }
    return {name for name, good in ok.items() if not good}


@bounded(300)
@given(kw=good_settings, wild=st.one_of(st.just({}), bad_settings, missed_settings))
def test_generation_config_settings(kw, wild):
    kw = {**kw, **wild}
    bad = invalid_settings(kw)
    made = []
    message = fails(lambda: made.append(GenerationConfig(model=CFG, **kw)), *bad)
    event("refused" if message else "accepted")
    assert (message is None) == (not bad), (bad, message)
    if made:
        g = made[0]
        for name in ("temperature", "top_p"):
            assert type(getattr(g, name)) is float and getattr(g, name) == kw[name]
        for name in ("top_k", "seed", "max_new_tokens"):
            assert type(getattr(g, name)) is int and getattr(g, name) == kw[name]
        assert g.stop_ids == (None if kw["stop_ids"] is None else tuple(int(t) for t in kw["stop_ids"]))


def test_sampling_at_the_edges_generates(params):
    for kw in [dict(temperature=1.0, top_k=V), dict(temperature=2, top_k=1, top_p=0.3, seed=2**32 - 1)]:
        r = generate(params, [[1, 2, 3]], GenerationConfig(model=CFG, max_new_tokens=3, stop_ids=(), **kw))
        assert len(r.tokens[0]) == 3 and all(is_token(t) for t in r.tokens[0])


# ---------------------------------------------------------------------------------------------------------
# Cache preset strings

FIELDS = [f.name for f in dataclasses.fields(PyramidConfig)]
amount = st.one_of(st.sampled_from(["0.45", "1.0", "0.2", "512", "256"]),  # good
                   st.sampled_from(["1.", ".5", "0", "2.0", "16", "90", "1e3", "-3", "nan", "\u0663", "\u00b2", ""]),
                   st.text("0123456789.", max_size=5))
base = st.one_of(st.sampled_from(["full", "paper", "", "Full"]),
                 st.builds(lambda f, a: f"{f}-{a}", st.sampled_from([*FAMILIES, "streamingllm", ""]), amount))
good_override = st.sampled_from([("min_tokens", "0"), ("recent_ratio", "0.1"), ("budget_profile", "uniform"),
                                 ("scorer", "accumulated"), ("num_sinks", "2"), ("gen_block", "8"), ("observe", "1"),
                                 ("recency_weight", "(1.0, 1.0)"), ("pool_kernel", "3"), ("protect_tail", "0"),
                                 ("max_window", "64"), ("prefill_bucket", "16"), ("recent_ratio", "1")])
value = st.one_of(st.sampled_from(["0", "1", "-1", "0.5", "1.5", "7", "64", "None", "True", "False", "nan", "1e999",
                                   "(1.0, 1.2)", "(1,)", "('a', 'b')", "[1, 2]", "{}", "'x'", "(1,", "window",
                                   "accumulated", "uniform", "linear", "budget", "none", "2**8", ""]),
                  st.text(max_size=4))
overrides = st.lists(st.one_of(good_override, good_override, st.tuples(st.sampled_from([*FIELDS, "colour"]), value)),
                     max_size=3)
spec = st.one_of(st.tuples(base, st.none()), st.tuples(base, overrides), st.tuples(st.text(max_size=12), st.none()))


@bounded(400)
@given(spec=spec)
def test_cache_preset_strings(spec):
    base, pairs = spec
    spec = base if pairs is None else f"{base}:{','.join(f'{k}={v}' for k, v in pairs)}"
    made = []
    message = fails(lambda: made.append(cache_preset(spec)), "cache preset", "PyramidConfig.")
    event("refused" if message else "accepted")
    if message is None:
        policy = made[0]
        assert isinstance(policy, PyramidConfig) and policy.name == spec
        for key, text in dict(pairs or []).items():  # the override as written, nothing else (the last one wins)
            if "," in text:
                continue  # may split into further items
            try:
                want = ast.literal_eval(text.strip())
            except (ValueError, SyntaxError):
                want = text.strip()
            got = getattr(policy, key)
            if key == "recency_weight":
                assert got == tuple(float(w) for w in want)
            else:
                assert got == want and type(got) is type(want)  # 1 stays 1, never 1.0 or True


def test_generation_config_cache_must_be_a_name_or_policy():
    for bad in [5, None, ["full"], b"full"]:
        with pytest.raises(ValueError, match="cache"):
            GenerationConfig(model=CFG, cache=bad)


# ---------------------------------------------------------------------------------------------------------
# logits and extend

batch = st.one_of(st.lists(st.lists(st.integers(0, V - 1), min_size=1, max_size=3), min_size=1, max_size=2),
                  st.lists(token, max_size=3), st.lists(st.lists(token, max_size=3), max_size=2), token)


@bounded(60)
@given(tokens=batch)
def test_logits_tokens(params, tokens):
    out = []
    message = fails(lambda: out.append(logits(params, tokens, CFG)), "tokens")
    event("refused" if message else "computed")
    rows = tokens if isinstance(tokens, list) and any(isinstance(t, list) for t in tokens) else [tokens]
    valid = (all(isinstance(r, list) and r and all(map(is_token, r)) for r in rows)
             and len({len(r) for r in rows}) == 1)
    assert (message is None) == valid, message
    if valid:
        assert out[0].shape == (len(rows), len(rows[0]), V)


def test_extend_refuses_float_tokens(params):
    plan = kvc.make_plan(PyramidConfig.full(), 16, 16, CFG.num_layers)
    seq = kvc.make_seq_plan(plan, [3], 16)
    _, cache = jax.jit(prefill, static_argnames=("plan", "cfg", "impl"))(
        params, np.array([[1, 2, 3] + [0] * 13], np.int32), seq, plan=plan, cfg=CFG, impl="xla")
    with pytest.raises(ValueError, match=r"tokens must be an integer array \[1, n\].*float32 of shape \(1, 2\)"):
        extend(params, cache, jnp.zeros((1, 2), jnp.float32), plan, CFG)
    with pytest.raises(ValueError, match=r"targets must be an integer array \[1, 2\]"):
        extend(params, cache, jnp.zeros((1, 2), jnp.int32), plan, CFG, targets=jnp.zeros((1, 3), jnp.int32))


# ---------------------------------------------------------------------------------------------------------
# The cases the hardening issue reported: each leaked an internal error or silently changed the input.

@pytest.mark.parametrize("prompts,kw,match", [
    ([b"Hello"], {}, r"prompt 0 must be a list of token ids, a string or a chat conversation .*got b'Hello' \(bytes\)"),
    ([None], {}, r"prompt 0 must be a list of token ids.*got None \(NoneType\)"),
    ([[1.5, 2.7]], {}, r"prompt 0 must hold integer token ids, but item 0 is 1.5 \(float\); token ids are ints, never "
                       "rounded"),
    ([[1, 2]], {"stop_ids": (2**31,)}, r"stop_ids has token ids outside the vocabulary \[0, 64\): \[2147483648\]"),
    ([[1, 2]], {"top_k": V + 1, "temperature": 1.0}, "top_k=65 exceeds the vocabulary"),
])
def test_reported_cases(params, prompts, kw, match):
    with pytest.raises(ValueError, match=match):
        generate(params, prompts, GenerationConfig(model=CFG, **kw))


# ---------------------------------------------------------------------------------------------------------
# Command lines: bad counts, policies and dtypes are refused while parsing, before any model loads.

@pytest.mark.parametrize("argv,expect", [
    (["plot-pyramid", "--layers", "0"], "argument --layers: 0 is too small; it must be >= 1"),
    (["plot-pyramid", "--prompt-len", "1.5"], "argument --prompt-len: '1.5' is not an int"),
    (["demo", "--cache", "budget-2.0"], "argument --cache: PyramidConfig.budget=2.0 is invalid"),
    (["bench", "throughput", "--new", "1"], "argument --new: 1 is too small; it must be >= 2"),
    (["bench", "sweep", "--cache", "full", "h2o"], "argument --cache: unknown cache preset 'h2o'"),
    (["bench", "parity", "--dtype", "int8"], "argument --dtype: unknown dtype 'int8'"),
    (["bench", "longrun", "--batches", "0"], "argument --batches: 0 is too small"),
])
def test_command_line_arguments(capsys, argv, expect):
    from pyrajax.cli import main
    try:
        status = main(argv)
    except SystemExit as e:  # `pyrajax bench` hands over to the benchmark's own parser
        status = e.code
    assert status == 2
    assert expect in capsys.readouterr().err
