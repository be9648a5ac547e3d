"""Continuous batching over the pyramid cache: B slots and three compiled programs over one donated state.

Requests arrive at any time with any length and leave when done. The engine keeps a fixed number of slots; every
layer's cache has one static capacity for all of them (`serving_plans`: sized for the longest prompt and output
the engine accepts under its policies), and everything that differs between requests, their per-layer schedules,
sampling settings, seeds, stop ids, is data in the slot. Three programs (`pyrajax.generate`) run it:

  * `prefill_program`: newly admitted requests of one prompt-length bucket, batched, with their first tokens;
  * `insert_program`: writes those caches and settings into free slots (slot indices are data);
  * `decode_program`: k steps for all slots, ending early when a slot finishes while requests wait.

`Engine.step` is one round of the host loop: admit, dispatch the next decode chunk, then read the previous chunk
(so the device works on chunk i + 1 while the host streams chunk i). `pyrajax.generate` is this loop run to
completion over one batch; the server runs it in its own thread.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pyrajax import cache as kvc
from pyrajax import sharding as shd
from pyrajax.cache import CachePlan, PyramidConfig
from pyrajax.config import ModelConfig
from pyrajax.generate import (DecodeState, Requests, _widen_ring, bucket, decode_program, insert_program, prefill,
                              prefill_program)
from pyrajax.params import Params

# Policy fields that only shape a request's schedule on the host (its SeqPlan): policies that differ in these
# alone run in the same compiled programs, so their requests share a batch.
HOST_FIELDS = ("name", "budget", "min_tokens", "max_window", "protect_tail", "protect_last_turn", "recent_ratio",
               "budget_profile", "length_bucket")


def compatible(policy: PyramidConfig, base: PyramidConfig) -> bool:
    """Whether `policy`'s requests can run in programs compiled for `base`."""
    try:
        return dataclasses.replace(policy, **{f: getattr(base, f) for f in HOST_FIELDS}) == base
    except ValueError:  # not even a valid policy with base's host fields
        return False


def resolve_policies(names: Sequence[str]) -> dict[str, PyramidConfig]:
    """Cache presets for one engine: the first compiles the programs. A later "full" under a budget policy
    becomes that family with a floor above every request: nothing is compressed, so the full cache's tokens
    (and output) in the same programs."""
    base = kvc.cache_preset(names[0])
    out = {names[0]: base}
    for name in names[1:]:
        policy = kvc.cache_preset(name)
        if name == "full" and base.gen_rule == "budget":
            policy = dataclasses.replace(base, name="full", budget=1.0, min_tokens=2**30)
        out[name] = policy
    return out


def prompt_buckets(max_prompt: int, min_bucket: int = 16) -> list[int]:
    """The prefill length buckets up to the one holding `max_prompt` (those of `generate`, from `min_bucket`:
    a larger smallest bucket pads short prompts further but compiles fewer prefill programs)."""
    out = [bucket(1, min_bucket)]
    while out[-1] < max_prompt:
        out.append(bucket(out[-1] + 1, min_bucket))
    return out


def serving_plans(policies: Sequence[PyramidConfig], max_prompt: int, max_new: int, num_layers: int,
                  max_protected: int = 128, min_bucket: int = 16) -> tuple[CachePlan, dict[int, CachePlan]]:
    """The engine's plan (every layer's capacity) and one prefill plan per prompt-length bucket, covering every
    prompt of 1..max_prompt tokens with 1 or max_new new tokens (the extremes of what a layer needs; fewer new
    tokens can need more room, when they leave a layer uncompressed) under each policy, with the policy's
    default protect mask or `max_protected` protected tokens (a chat conversation's). All policies must be
    `compatible` with the first, whose fields the programs compile. `Engine.prepare` checks every request
    against its plan and refuses one that does not fit (e.g. a longer protected span): never truncated."""
    base, L = policies[0], num_layers
    for p in policies[1:]:
        if not compatible(p, base):
            raise ValueError(f"cache policy {p.name!r} cannot share programs with {base.name!r}: they differ in "
                             f"more than {', '.join(HOST_FIELDS)}")
    plans = {}
    lo = 1
    for S_b in prompt_buckets(max_prompt, min_bucket):
        per_policy = []
        for policy in policies:
            requests = tuple((s, t, prot) for s in range(lo, min(S_b, max_prompt) + 1) for t in {1, max_new}
                             for prot in {kvc.protected_outside(policy, s), min(max_protected, s)}
                             if policy.protects or prot == 0)
            plan = kvc.make_plan(policy, S_b, max_new, L, requests=requests)
            per_policy.append(dataclasses.replace(plan, policy=base))
        plans[S_b] = functools.reduce(_cover, per_policy)
        lo = S_b + 1
    capacity = tuple(max(p.capacity[l] for p in plans.values()) for l in range(L))
    S_max = max(plans)
    plans = {S_b: dataclasses.replace(p, capacity=capacity, prompt_bucket=S_max) for S_b, p in plans.items()}
    return dataclasses.replace(plans[S_max], window=max(p.window for p in plans.values())), plans


def _cover(a: CachePlan, b: CachePlan) -> CachePlan:
    """The smallest plan that holds both (same policy, buckets and evictions)."""
    most = lambda x, y: tuple(map(max, x, y))  # noqa: E731
    return dataclasses.replace(a, window=max(a.window, b.window), prefill=most(a.prefill, b.prefill),
                               capacity=most(a.capacity, b.capacity))


def make_engine(params: Params, cfg: ModelConfig, policies: Sequence[PyramidConfig], *, slots: int,
                max_prompt: int, max_new: int, max_protected: int = 128, min_bucket: int = 16, **kw) -> "Engine":
    """A serving engine: `slots` slots whose caches hold any prompt of up to `max_prompt` tokens and `max_new`
    new tokens under each of `policies` (the first compiles the programs); prompts are padded to power-of-two
    buckets from `min_bucket`. kw: see `Engine`."""
    plan, prefill_plans = serving_plans(policies, max_prompt, max_new, cfg.num_layers, max_protected, min_bucket)
    return Engine(params, cfg, plan, prefill_plans, slots=slots, **kw)


# ---------------------------------------------------------------------------------------------------------
# Requests on the host

@dataclasses.dataclass
class Request:
    """One generation request as the engine takes it: prompt token ids and its settings."""
    ids: Sequence[int]
    max_new: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: Sequence[int] = ()
    protect: np.ndarray | None = None  # prompt tokens a budget policy never evicts (None: the policy's default)
    suffix: Sequence[int] = ()  # fed after the prompt is compressed, before generating
    policy: PyramidConfig | None = None  # None: the engine's


@dataclasses.dataclass(eq=False)
class Stream:
    """A request inside the engine: what it produced so far and when."""
    request: Request
    seq: kvc.SeqPlan  # its schedule, one row
    bucket: int
    on_event: Callable[["Stream", list[int], str | None], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    slot: int | None = None
    lengths_after_prefill: list[int] | None = None
    lengths_at_end: list[int] | None = None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None


def request_rows(requests: list[Request], stop_width: int, forced: int) -> Requests:
    """The settings of `requests` as device rows (stop ids padded to `stop_width`, suffixes to `forced`)."""
    n = len(requests)
    stop = np.full((n, stop_width), -1, np.int32)
    suffix = np.zeros((n, forced), np.int32)
    for i, r in enumerate(requests):
        stop[i, :len(r.stop_ids)] = r.stop_ids
        suffix[i, :len(r.suffix)] = r.suffix
    col = lambda f, dtype: np.array([getattr(r, f) for r in requests], dtype)  # noqa: E731
    return Requests(seed=col("seed", np.uint32), temperature=col("temperature", np.float32),
                    top_k=col("top_k", np.int32), top_p=col("top_p", np.float32), max_new=col("max_new", np.int32),
                    stop=stop, forced=suffix, n_forced=np.array([len(r.suffix) for r in requests], np.int32))


class QueueFull(RuntimeError):
    """The waiting queue is at its limit (the server answers 503)."""


class Engine:
    """B slots over one decode state; see the module docstring. Thread safety: `prepare`, `submit` and `cancel`
    may be called from any thread; `step` from one thread only (the one that owns every JAX call)."""

    def __init__(self, params: Params, cfg: ModelConfig, plan: CachePlan, prefill_plans: Mapping[int, CachePlan],
                 *, slots: int, steps: int = 8, forced: int = 1, stop_width: int = 8,
                 max_prefill_batch: int | None = None, prefill_tokens: int | None = None,
                 max_waiting: int | None = None, impl: str = "auto"):
        self.params, self.cfg, self.plan, self.impl = params, cfg, plan, impl
        self.mesh = shd.mesh_of(params)  # tensor parallelism: the programs run over the params' mesh
        self.prefill_plans = dict(prefill_plans)
        self.slots, self.steps, self.forced, self.stop_width = slots, steps, forced, stop_width
        self.max_prefill_batch = max_prefill_batch or slots
        self.prefill_tokens, self.max_waiting = prefill_tokens, max_waiting
        S_b = min(self.prefill_plans)
        self.state = empty_state(params, cfg, plan, self.prefill_plans[S_b], S_b, slots, forced, stop_width, impl,
                                 self.mesh)
        # The model's own KV bytes (KV heads copied for tensor parallelism counted once), and one device's share.
        copies = params.layers[0].kv_copies if params.layers else 1
        self.kv_bytes_per_layer = [b // copies for b in kvc.kv_bytes(self.state.cache)]
        self.kv_bytes_per_device = shd.bytes_per_device([(lc.k, lc.v) for lc in self.state.cache.layers])
        self.kv_bytes_per_token = cfg.kv_bytes_per_token_layer(jnp.dtype(params.embed.dtype).itemsize)
        self.owner: list[Stream | None] = [None] * slots
        self.waiting: collections.deque[Stream] = collections.deque()
        self._lock = threading.Lock()
        self._inbox: list[Stream] = []
        self._cancels: list[tuple[Stream, str]] = []
        self._pending = None  # the dispatched chunk not yet read: (tokens, lengths, owners)
        self._cancel_mask = np.zeros(slots, bool)
        self.generated_tokens = 0
        self.live_tokens = 0  # cached tokens of occupied slots, as of the last chunk read
        self._lengths = np.zeros((slots, plan.num_layers), np.int64)

    # ------------------------------------------------------------------------------------------- requests
    @property
    def max_prompt(self) -> int:
        return max(self.prefill_plans)

    def prepare(self, request: Request, on_event=None) -> Stream:
        """Validate a request and compute its schedule: a ValueError says what is wrong with it."""
        r, cfg = request, self.cfg
        ids = [int(t) for t in r.ids]
        if not ids or not all(0 <= t < cfg.vocab_size for t in ids):
            raise ValueError(f"the prompt must be a non-empty list of token ids in [0, {cfg.vocab_size})")
        if len(ids) > self.max_prompt:
            raise ValueError(f"the prompt has {len(ids)} tokens; this engine's maximum context for a prompt is "
                             f"{self.max_prompt} tokens")
        if not isinstance(r.max_new, int) or not 1 <= r.max_new <= self.plan.new_bucket - len(r.suffix):
            raise ValueError(f"max_new={r.max_new!r} (+ {len(r.suffix)} suffix tokens) must be an int in "
                             f"[1, {self.plan.new_bucket - len(r.suffix)}]")
        after = len(r.suffix) + r.max_new
        if len(ids) + after > cfg.max_positions:
            raise ValueError(f"{len(ids)} prompt + {after} new tokens exceed the model's {cfg.max_positions} positions")
        if len(r.suffix) > self.forced:
            raise ValueError(f"{len(r.suffix)} suffix tokens; this engine feeds at most {self.forced}")
        if not r.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {r.temperature}")
        if not 0 < r.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {r.top_p}")
        if not isinstance(r.top_k, int) or not 0 <= r.top_k <= cfg.vocab_size:
            raise ValueError(f"top_k must be an int in [0, {cfg.vocab_size}] (0 = off), got {r.top_k!r}")
        if not isinstance(r.seed, int) or not 0 <= r.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {r.seed!r}")
        if len(r.stop_ids) > self.stop_width:
            raise ValueError(f"{len(r.stop_ids)} stop ids; at most {self.stop_width}")
        S_b = next(b for b in sorted(self.prefill_plans) if b >= len(ids))
        policy = r.policy or self.plan.policy
        plan = dataclasses.replace(self.prefill_plans[S_b], policy=policy)
        try:
            seq = kvc.make_seq_plan(plan, [len(ids)], [after], None if r.protect is None else [r.protect])
        except ValueError as e:  # outside the capacities this engine was sized for
            raise ValueError(f"the request does not fit this engine's cache ({e}); allow more protected tokens or "
                             "a longer output when starting it") from None
        request = dataclasses.replace(request, ids=ids)
        return Stream(request=request, seq=seq, bucket=S_b, on_event=on_event)

    def submit(self, stream: Stream) -> Stream:
        """Queue a prepared request (QueueFull when `max_waiting` wait already)."""
        with self._lock:
            if self.max_waiting is not None and len(self.waiting) + len(self._inbox) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are waiting already")
            self._inbox.append(stream)
        return stream

    def cancel(self, stream: Stream, reason: str = "cancelled") -> None:
        """End a request (a client gone, a stop string seen): its slot is free after the next decode chunk."""
        with self._lock:
            self._cancels.append((stream, reason))

    @property
    def running(self) -> int:
        return sum(o is not None for o in self.owner)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting or self._inbox or self._pending is not None)

    # ------------------------------------------------------------------------------------------- the loop
    def step(self) -> bool:
        """One round: cancellations, admission (prefill + insert) and the new requests' first tokens, the next
        decode chunk, then the previous chunk's tokens. Returns whether work remains."""
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox, cancels, self._cancels = [], self._cancels, []
        for stream, reason in cancels:
            if stream.finish is not None:
                continue
            if stream.slot is not None:
                self._cancel_mask[stream.slot] = True
            elif stream in self.waiting:
                self.waiting.remove(stream)
            self._finish(stream, reason)
        # The new requests' first tokens are read before the next decode chunk is dispatched: a chunk's dispatch
        # returns only when its while loop has run (XLA's GPU loops test their condition on the host), so they
        # would otherwise wait a whole chunk (and prefill time would count as decode time).
        for rows, first, lengths in self._admit():
            for stream, token, length in zip(rows, np.asarray(first), np.asarray(lengths)):
                stream.lengths_after_prefill = stream.lengths_at_end = length.tolist()
                if stream.finish is None:
                    stream.first_token_at = time.perf_counter()
                    self._emit(stream, [] if stream.request.suffix else [int(token)])
        dispatched = None
        if self.running or self._cancel_mask.any():
            owners = list(self.owner)
            self.state, out, lengths = decode_program(
                self.params, self.state, self._cancel_mask, np.bool_(bool(self.waiting)), plan=self.plan,
                cfg=self.cfg, impl=self.impl, steps=self.steps, mesh=self.mesh)
            dispatched = (out, lengths, owners)
            self._cancel_mask = np.zeros(self.slots, bool)
        for i, o in enumerate(self.owner):  # cancelled slots were ended by this chunk: free for the next round
            if o is not None and o.finish is not None:
                self.owner[i] = None
        pending, self._pending = self._pending, dispatched
        if pending is not None:
            self._read_chunk(*pending)
        return self.busy

    def run(self) -> None:
        """Step until every submitted request has finished (the offline loop)."""
        while self.step():
            pass

    def _admit(self):
        free = [i for i, o in enumerate(self.owner) if o is None]
        chosen, tokens = [], 0
        while self.waiting and len(chosen) < len(free):
            nxt = self.waiting[0]
            if chosen and self.prefill_tokens is not None and tokens + nxt.bucket > self.prefill_tokens:
                break  # this round's prompt tokens are spent: decoding slots are not stalled for long
            chosen.append(self.waiting.popleft())
            tokens += nxt.bucket
        admitted = []
        by_bucket = collections.defaultdict(list)
        for stream in chosen:
            by_bucket[stream.bucket].append(stream)
        slots = iter(free)
        for S_b, group in sorted(by_bucket.items()):
            size = self.prefill_batch(S_b)
            for i in range(0, len(group), size):
                rows = group[i:i + size]
                for stream in rows:
                    stream.slot = next(slots)
                    self.owner[stream.slot] = stream
                admitted.append((rows, *self._prefill_insert(S_b, rows)))
        return admitted

    def prefill_batch(self, S_b: int) -> int:
        """Rows of a prefill batch of bucket S_b when more than one request arrives: `max_prefill_batch`,
        fewer where their prompt tokens would pass `prefill_tokens`. (A lone arrival is prefilled alone: two
        programs per bucket.)"""
        cap = self.max_prefill_batch if self.prefill_tokens is None else self.prefill_tokens // S_b
        return max(1, min(self.max_prefill_batch, cap))

    def warmup(self) -> None:
        """Compile every program this engine can run (each prefill bucket and batch size, insert, decode), with
        rows dropped at insert: the slots stay as they are."""
        for S_b in sorted(self.prefill_plans):
            for P in sorted({1, self.prefill_batch(S_b)}):
                ids = [self.cfg.pad_id] * S_b
                stream = self.prepare(Request(ids=ids, max_new=1))
                self._prefill_insert(S_b, [stream] * P, dropped=True)
        self.state, out, _ = decode_program(self.params, self.state, np.zeros(self.slots, bool), np.bool_(False),
                                            plan=self.plan, cfg=self.cfg, impl=self.impl, steps=self.steps,
                                            mesh=self.mesh)
        jax.block_until_ready(out)

    def _prefill_insert(self, S_b: int, rows: list[Stream], dropped: bool = False):
        P = 1 if len(rows) == 1 else self.prefill_batch(S_b)
        filled = rows + [rows[0]] * (P - len(rows))  # filler rows repeat the first; their slot index drops them
        tokens = np.full((P, S_b), self.cfg.pad_id, np.int32)
        for i, stream in enumerate(filled):
            tokens[i, :len(stream.request.ids)] = stream.request.ids
        seq = jax.tree.map(lambda *xs: np.concatenate(xs), *[s.seq for s in filled])
        req = request_rows([s.request for s in filled], self.stop_width, self.forced)
        slot = np.array([self.slots if dropped else s.slot for s in rows] + [self.slots] * (P - len(rows)), np.int32)
        first, cache, lengths = prefill_program(self.params, tokens, seq, req, plan=self.prefill_plans[S_b],
                                                cfg=self.cfg, impl=self.impl, window=self.plan.window, mesh=self.mesh)
        self.state = insert_program(self.state, cache, req, first, slot, mesh=self.mesh)
        return first, lengths

    def _read_chunk(self, out, lengths, owners):
        out, lengths = np.asarray(out), np.asarray(lengths)
        for slot, stream in enumerate(owners):
            if stream is None or stream.finish is not None:
                continue
            self._lengths[slot] = lengths[slot]
            stream.lengths_at_end = lengths[slot].tolist()
            row = out[slot]
            self._emit(stream, row[row >= 0].tolist())
        self.live_tokens = int(sum(self._lengths[i].sum() for i, o in enumerate(self.owner) if o is not None))

    def _emit(self, stream: Stream, tokens: list[int]) -> None:
        """Hand new tokens to the request; end it where the device ended it (a stop id, or max_new)."""
        r, finish = stream.request, None
        for n, t in enumerate(tokens):
            stream.tokens.append(t)
            if t in r.stop_ids or len(stream.tokens) >= r.max_new:
                finish = "stop" if t in r.stop_ids else "length"
                tokens = tokens[:n + 1]
                break
        self.generated_tokens += len(tokens)
        if finish is not None:
            self.owner[stream.slot] = None
            self._finish(stream, finish, tokens)
        elif tokens and stream.on_event is not None:
            stream.on_event(stream, tokens, None)

    def _finish(self, stream: Stream, reason: str, tokens: list[int] = ()) -> None:
        stream.finish, stream.finished_at = reason, time.perf_counter()
        if stream.on_event is not None:
            stream.on_event(stream, list(tokens), reason)

    def fail(self, message: str) -> None:
        """After a failed step: end every request in flight with the error and start over with empty slots
        (the donated state may be gone)."""
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox = []
        for stream in [o for o in self.owner if o is not None] + list(self.waiting):
            if stream.finish is None:
                stream.error = message
                self._finish(stream, "error")
        self.owner, self.waiting, self._pending = [None] * self.slots, collections.deque(), None
        self._cancel_mask[:] = False
        S_b = min(self.prefill_plans)
        self.state = empty_state(self.params, self.cfg, self.plan, self.prefill_plans[S_b], S_b, self.slots,
                                 self.forced, self.stop_width, self.impl, self.mesh)

    # ------------------------------------------------------------------------------------------- stats
    def metrics(self) -> dict:
        return dict(running=self.running, waiting=len(self.waiting) + len(self._inbox), slots=self.slots,
                    generated_tokens=self.generated_tokens, kv_bytes=int(sum(self.kv_bytes_per_layer)),
                    live_kv_bytes=int(self.live_tokens * self.kv_bytes_per_token))


@functools.lru_cache(maxsize=16)
def _state_shapes(shapes, cfg, plan, prefill_plan, S_b, slots, impl):
    params = jax.tree.unflatten(shapes[0], shapes[1])
    seq = kvc.SeqPlan(*(jax.ShapeDtypeStruct((slots,) + s, d) for s, d in
                        [((), jnp.int32), ((), jnp.int32)] + [((plan.num_layers,), jnp.int32)] * 3
                        + [((plan.prompt_bucket,), jnp.bool_)]))
    tokens = jax.ShapeDtypeStruct((slots, S_b), jnp.int32)
    return jax.eval_shape(lambda p, t, s: _widen_ring(prefill(p, t, s, prefill_plan, cfg, impl)[1], plan.window),
                          params, tokens, seq)


def empty_state(params: Params, cfg: ModelConfig, plan: CachePlan, prefill_plan: CachePlan, S_b: int,
                slots: int, forced: int, stop_width: int, impl: str, mesh=None) -> DecodeState:
    """A decode state of `slots` free slots: the cache pytree that prefill makes (traced, never run), empty;
    on the params' `mesh` in the programs' layout (`pyrajax.sharding.state_specs`)."""
    leaves, tree = jax.tree.flatten(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    shapes = _state_shapes((tree, tuple(leaves)), cfg, plan, prefill_plan, S_b, slots, impl)

    def fill(path, s):
        name = getattr(path[-1], "name", None)
        value = -1 if name in ("pos", "row_pos") else 1 if name == "window" else 0
        return jnp.full(s.shape, value, s.dtype)

    def make():
        cache = jax.tree_util.tree_map_with_path(fill, shapes)
        z = lambda dtype, *shape: jnp.zeros((slots,) + shape, dtype)  # noqa: E731
        req = Requests(seed=z(jnp.uint32), temperature=z(jnp.float32), top_k=z(jnp.int32), top_p=jnp.ones(slots),
                       max_new=z(jnp.int32), stop=jnp.full((slots, stop_width), -1, jnp.int32),
                       forced=z(jnp.int32, forced), n_forced=z(jnp.int32))
        return DecodeState(cache=cache, req=req, token=z(jnp.int32), count=z(jnp.int32), fed=z(jnp.int32),
                           done=jnp.ones(slots, bool))

    return shd.create_state(make, mesh)
