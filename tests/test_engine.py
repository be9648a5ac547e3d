"""The serving engine: slots, insert, slot reuse, staggered arrivals with mixed settings and policies, and one
compilation per bucket (tiny random model: the programs are the same for any model)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import pyrajax
from pyrajax.cache import cache_preset
from pyrajax.engine import Engine, QueueFull, Request, empty_state, make_engine, request_rows, serving_plans
from pyrajax.generate import TRACE_COUNTS, decode_program, insert_program, prefill_program

POLICIES = [cache_preset("budget-0.6:min_tokens=0"), cache_preset("budget-0.45:min_tokens=0,recent_ratio=0.1")]
STOP = (7,)


@pytest.fixture(scope="module")
def tiny():
    cfg = pyrajax.preset("tiny")
    return pyrajax.random_params(jax.random.key(3), cfg, scale=0.25), cfg


@pytest.fixture(scope="module")
def engine(tiny):
    params, cfg = tiny
    return make_engine(params, cfg, POLICIES, slots=3, max_prompt=200, max_new=48, max_prefill_batch=2)


def alone(tiny, ids, new, policy, **kw):
    """`pyrajax.generate` of one request by itself: tokens (stop id dropped) and per-layer lengths at the end."""
    params, cfg = tiny
    r = pyrajax.generate(params, [ids], pyrajax.GenerationConfig(model=cfg, max_new_tokens=new, cache=policy,
                                                                 stop_ids=STOP, **kw))
    return r.tokens[0], r.stats["lengths_at_end"][0]


def served(stream):
    return [t for t in stream.tokens if t not in STOP], stream.lengths_at_end


def random_requests(n, seed, lengths=((20, 32), (100, 128)), news=(17, 32)):
    """Mixed lengths, settings and policies; few buckets (each compiles `generate`'s programs once)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kw = dict(temperature=float(rng.choice([0, 0.9])), top_k=int(rng.choice([0, 5])),
                  top_p=float(rng.choice([1.0, 0.8])), seed=int(rng.integers(2**32)))
        lo, hi = lengths[i % len(lengths)]
        out.append((rng.integers(3, 256, int(rng.integers(lo, hi + 1))).tolist(),
                    int(rng.integers(news[0], news[1] + 1)), POLICIES[(i // len(lengths)) % 2], kw))
    return out


def test_insert_into_any_slot_equals_a_fresh_prefill(tiny, engine):
    """The slot index is data: the inserted row is the prefill's row bit for bit, the other slots untouched,
    and decoding from any slot gives the same tokens."""
    params, cfg = tiny
    ids = list(range(3, 120))
    stream = engine.prepare(Request(ids=ids, max_new=20, policy=POLICIES[1], stop_ids=STOP))
    plan = engine.prefill_plans[stream.bucket]
    tokens = np.full((1, stream.bucket), cfg.pad_id, np.int32)
    tokens[0, :len(ids)] = ids
    req = request_rows([stream.request], engine.stop_width, engine.forced)
    first, cache, _ = prefill_program(params, tokens, stream.seq, req, plan=plan, cfg=cfg, impl="auto",
                                      window=engine.plan.window)
    empty = lambda: empty_state(params, cfg, engine.plan, plan, stream.bucket, engine.slots, 1, 8, "auto")  # noqa: E731
    blank = jax.tree.leaves(empty())
    outs = []
    for slot in range(engine.slots):
        state = insert_program(empty(), cache, req, first, np.array([slot], np.int32))
        for got, want, before in zip(jax.tree.leaves(state.cache), jax.tree.leaves(cache), blank):
            got = np.asarray(got)
            np.testing.assert_array_equal(got[slot], np.asarray(want)[0])
            np.testing.assert_array_equal(np.delete(got, slot, axis=0), np.delete(np.asarray(before), slot, axis=0))
        _, out, _ = decode_program(params, state, np.zeros(engine.slots, bool), np.bool_(False), plan=engine.plan,
                                   cfg=cfg, impl="auto", steps=24)
        outs.append([int(first[0])] + np.asarray(out)[slot].tolist())
    assert outs[0] == outs[1] == outs[2]
    want, _ = alone(tiny, ids, 20, POLICIES[1])
    assert [t for t in outs[0] if t >= 0 and t not in STOP][:20] == want


def test_staggered_requests_with_mixed_settings_equal_each_alone(tiny, engine):
    """Requests arrive one decode chunk apart, wait for slots and reuse them; every one, whatever its policy,
    sampling settings, seed and companions, gives what `generate` gives it alone (and holds the same KV)."""
    requests = random_requests(8, seed=0)
    streams = []
    for ids, new, policy, kw in requests:
        streams.append(engine.submit(engine.prepare(Request(ids=ids, max_new=new, policy=policy, stop_ids=STOP,
                                                            **kw))))
        engine.step()
    engine.run()
    assert not engine.busy and engine.running == 0
    for (ids, new, policy, kw), stream in zip(requests, streams):
        assert stream.finish in ("stop", "length")
        assert served(stream) == alone(tiny, ids, new, policy, **kw)


def test_slot_reuse_equals_a_fresh_engine(tiny, engine):
    """One slot, used by a long compressed request and then by others: each result equals a fresh engine's."""
    params, cfg = tiny
    one = Engine(params, cfg, engine.plan, engine.prefill_plans, slots=1)
    requests = random_requests(3, seed=1)
    for ids, new, policy, kw in requests:
        stream = one.submit(one.prepare(Request(ids=ids, max_new=new, policy=policy, stop_ids=STOP, **kw)))
        one.run()
        fresh = Engine(params, cfg, engine.plan, engine.prefill_plans, slots=1)
        again = fresh.submit(fresh.prepare(Request(ids=ids, max_new=new, policy=policy, stop_ids=STOP, **kw)))
        fresh.run()
        assert served(stream) == served(again) and stream.finish == again.finish


def test_compiles_once_per_bucket(tiny, engine):
    """Many requests of every length and setting: one prefill per prompt bucket, one insert, one decode."""
    engine.run()
    before = dict(TRACE_COUNTS)
    requests = random_requests(10, seed=2, lengths=((1, 16), (17, 32), (33, 64)), news=(1, 48))
    requests.append((list(range(3, 200)), 5, POLICIES[0], {}))
    for ids, new, policy, kw in requests:
        engine.submit(engine.prepare(Request(ids=ids, max_new=new, policy=policy, stop_ids=STOP, **kw)))
    engine.run()
    assert TRACE_COUNTS["insert"] == before["insert"] and TRACE_COUNTS["decode"] == before["decode"]
    assert TRACE_COUNTS["prefill"] - before["prefill"] <= 3  # buckets 16, 64 and 256 (32, 128: compiled earlier)


def test_cancel_frees_the_slot_and_queue_limit(tiny):
    params, cfg = tiny
    eng = make_engine(params, cfg, POLICIES[:1], slots=1, max_prompt=64, max_new=48, max_waiting=1)
    events = []
    a = eng.submit(eng.prepare(Request(ids=[5, 6, 7, 8], max_new=40), on_event=lambda s, t, f: events.append(f)))
    eng.step()
    b = eng.submit(eng.prepare(Request(ids=[9, 10], max_new=3)))  # waits: one slot
    with pytest.raises(QueueFull):
        eng.submit(eng.prepare(Request(ids=[11], max_new=3)))
    eng.step()
    assert a.slot == 0 and b.slot is None and 0 < len(a.tokens) < 40
    eng.cancel(a)
    for _ in range(3):  # two decode chunks at most
        eng.step()
        if b.slot is not None:
            break
    assert a.finish == "cancelled" and events[-1] == "cancelled" and b.slot == 0
    eng.run()
    assert b.finish == "length" and len(b.tokens) == 3 and eng.running == 0


@pytest.mark.parametrize("request_, match", [
    (Request(ids=[], max_new=4), "non-empty"),
    (Request(ids=[300], max_new=4), "token ids in"),
    (Request(ids=[5] * 65, max_new=4), "maximum context for a prompt is 64"),
    (Request(ids=[5], max_new=49), "max_new=49"),
    (Request(ids=[5], max_new=4, top_p=0.0), "top_p"),
    (Request(ids=[5], max_new=4, temperature=-1.0), "temperature"),
    (Request(ids=[5], max_new=4, seed=-1), "seed"),
])
def test_bad_requests_are_refused(tiny, request_, match):
    params, cfg = tiny
    eng = make_engine(params, cfg, POLICIES[:1], slots=1, max_prompt=64, max_new=48)
    with pytest.raises(ValueError, match=match):
        eng.prepare(request_)


def test_serving_plan_covers_short_outputs_and_chat_masks():
    """Fewer new tokens or a protected span can need more per-layer room than the longest request; the plan
    holds every prompt length with 1 or max_new tokens and up to max_protected protected tokens."""
    policy = cache_preset("budget-0.45")
    plan, plans = serving_plans([policy], 600, 64, 8, max_protected=96)
    from pyrajax.cache import make_seq_plan
    import dataclasses
    for s in (17, 100, 255, 256, 300, 600):
        for t in (1, 8, 64):
            for protected in (None, min(s, 96)):
                mask = None if protected is None else np.arange(s) >= s - protected
                p = plans[next(b for b in sorted(plans) if b >= s)]
                make_seq_plan(dataclasses.replace(p, policy=policy), [s], [t], [mask])  # raises if it does not fit
    assert plan.capacity == plans[max(plans)].capacity
    with pytest.raises(ValueError, match="cannot share programs"):
        serving_plans([policy, cache_preset("h2o-0.45")], 64, 16, 4)


def test_warmup_compiles_everything_and_leaves_the_slots_free(tiny):
    params, cfg = tiny
    eng = make_engine(params, cfg, POLICIES[:1], slots=2, max_prompt=32, max_new=16, max_prefill_batch=2)
    eng.warmup()
    assert eng.running == 0 and not eng.busy
    before = dict(TRACE_COUNTS)
    streams = [eng.submit(eng.prepare(Request(ids=list(range(3, 3 + n)), max_new=5))) for n in (4, 9, 20, 30, 31)]
    eng.run()
    assert dict(TRACE_COUNTS) == before
    for s in streams:
        assert served(s) == alone(tiny, list(s.request.ids), 5, POLICIES[0])


def test_a_larger_smallest_bucket_pads_short_prompts_and_keeps_their_output(tiny):
    """`min_bucket` (the server's --min-bucket) only changes padding: fewer programs, the same tokens."""
    params, cfg = tiny
    eng = make_engine(params, cfg, POLICIES[:1], slots=2, max_prompt=100, max_new=24, min_bucket=64)
    assert sorted(eng.prefill_plans) == [64, 128]
    ids = list(range(5, 25))
    stream = eng.submit(eng.prepare(Request(ids=ids, max_new=24, stop_ids=STOP)))
    assert stream.bucket == 64
    eng.run()
    assert served(stream)[0] == alone(tiny, ids, 24, POLICIES[0])[0]


def test_generate_output_does_not_depend_on_decode_chunk(tiny):
    """Offline `generate` decodes in one device call by default; chunks of any size give the same tokens and
    the same caches (a ragged batch, a compressing policy, forced suffix tokens)."""
    params, cfg = tiny
    prompts = [list(range(3, 150)), list(range(40, 61))]
    runs = [pyrajax.generate(params, prompts, pyrajax.GenerationConfig(
        model=cfg, max_new_tokens=30, cache=POLICIES[1], stop_ids=STOP, decode_chunk=chunk),
        suffixes=[[9, 10, 11], []]) for chunk in (None, 3, 8)]
    for r in runs[1:]:
        assert r.tokens == runs[0].tokens and r.stats["lengths_at_end"] == runs[0].stats["lengths_at_end"]
    assert runs[0].stats["compressed"] and all(len(t) > 0 for t in runs[0].tokens)
    with pytest.raises(ValueError, match="decode_chunk"):
        pyrajax.GenerationConfig(model=cfg, decode_chunk=0)
