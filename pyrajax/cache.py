"""KV cache as a pytree, and the cache policies (full, PyramidInfer and the same-engine baselines StreamingLLM,
H2O, SnapKV, PyramidKV) as data.

Layout invariants, for every layer and every sequence b:
  * after prefill, slots [0, length[b]) hold valid tokens in original order and the rest are empty (pos -1);
    generation writes each new token into the first empty slot, and eviction empties slots in place, so
    later the valid slots (length[b] of them) may be in any order: nothing depends on slot order;
  * `pos` is each token's original position; keys are stored after RoPE.
Each layer's capacity is a static Python number computed from the prompt bucket, the generation bucket and
the policy (`CachePlan`), so one compiled program serves every request of a bucket. What differs between
sequences of one batch (prompt length, window, per-layer keep counts and budgets) is *data* (`SeqPlan`),
which is why a sequence's result never depends on its batch companions.

The full cache is the same machinery with nothing dropped: `PyramidConfig.full()`.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float, Int

from pyrajax.config import ModelConfig

BIG = 3e38  # priority of tokens that must be kept (sinks, window) and of empty slots during eviction


# ---------------------------------------------------------------------------------------------------------
# Policy configuration

@dataclasses.dataclass(frozen=True)
class PyramidConfig:
    """A cache policy. `prefill_schedule` decides how many tokens enter each layer during prefill;
    `gen_rule` decides what generation evicts.

    prefill_schedule: "none" (every layer sees the whole prompt), "cosine" (the reference's compounding
        keep fraction s_l = (1-r)(cos(pi l/L)+1)/2 + r of the context), "budget" (layer l's prefill
        length is its budget minus one generation block).
    gen_rule: "none" (append only), "reference" (every `gen_block` tokens that leave the recent window are
        cut to k_l = max(floor(gen_block * gen_decay * g_l), 1)), "budget" (when a layer's cache reaches its
        budget, the `gen_block` lowest-scored tokens outside sinks and window are evicted).
    prune_hidden: True (PyramidInfer) drops the unselected tokens' hidden states, so deeper layers compute and
        cache fewer tokens; False (SnapKV, PyramidKV, H2O, StreamingLLM) runs every prompt token through every
        layer and selects only what each layer's cache keeps, by that layer's own scores.
    budget_profile: how the budget is spread over layers: "pyramid" (cosine, high to low), "linear" (PyramidKV)
        or "uniform" (the same budget at every layer). With prune_hidden, layer 0 holds the whole prompt.
    scorer: what a token's importance is. "window": the recency-weighted mean attention of the last W queries
        (max-pooled over `pool_kernel` neighbouring keys in prefill when > 1, as SnapKV); "accumulated": the
        attention summed over every query so far (H2O's heavy hitters); "recency": its position (StreamingLLM:
        sinks + the most recent tokens). Every scorer averages over heads: one index set per layer serves
        every KV head, so one gather moves a layer's keys and values.
    """
    name: str = "custom"
    recent_ratio: float = 0.2
    recency_weight: tuple[float, float] = (1.0, 1.2)
    num_sinks: int = 4
    prefill_schedule: str = "cosine"
    decay_ratio: float = 0.9
    min_context: int = 64
    gen_rule: str = "reference"
    gen_block: int = 16
    gen_decay: float = 0.9
    budget: float | None = None
    prune_hidden: bool = True
    budget_profile: str = "pyramid"
    scorer: str = "window"
    pool_kernel: int = 1
    length_bucket: int = 8
    # Slots entering each layer in prefill are rounded up to a multiple of this (the extra slots are empty):
    # few distinct matmul shapes compile (and autotune) far faster than one per layer.
    prefill_bucket: int = 64

    def __post_init__(self):
        def need(ok, field, allowed):
            if not ok:
                raise ValueError(f"PyramidConfig.{field}={getattr(self, field)!r} is invalid: {allowed}")
        need(0 < self.recent_ratio <= 1, "recent_ratio", "must lie in (0, 1]")
        need(len(self.recency_weight) == 2 and 0 < self.recency_weight[0] <= self.recency_weight[1],
             "recency_weight", "must be (first, last) with 0 < first <= last")
        need(isinstance(self.num_sinks, int) and self.num_sinks >= 0, "num_sinks", "must be an int >= 0")
        need(self.prefill_schedule in ("none", "cosine", "budget"), "prefill_schedule",
             "must be 'none', 'cosine' or 'budget'")
        need(0 < self.decay_ratio <= 1, "decay_ratio", "must lie in (0, 1]")
        need(isinstance(self.min_context, int) and self.min_context >= 0, "min_context", "must be an int >= 0")
        need(self.gen_rule in ("none", "reference", "budget"), "gen_rule",
             "must be 'none', 'reference' or 'budget'")
        need(isinstance(self.gen_block, int) and self.gen_block >= 1, "gen_block", "must be an int >= 1")
        need(0 < self.gen_decay <= 1, "gen_decay", "must lie in (0, 1]")
        need(isinstance(self.prune_hidden, bool), "prune_hidden", "must be True or False")
        need(self.budget_profile in ("pyramid", "linear", "uniform"), "budget_profile",
             "must be 'pyramid', 'linear' or 'uniform'")
        need(self.scorer in ("window", "accumulated", "recency"), "scorer",
             "must be 'window', 'accumulated' or 'recency'")
        need(isinstance(self.pool_kernel, int) and self.pool_kernel >= 1 and self.pool_kernel % 2 == 1,
             "pool_kernel", "must be an odd int >= 1")
        for f in ("length_bucket", "prefill_bucket"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, f, "must be an int >= 1")
        is_budget = "budget" in (self.prefill_schedule, self.gen_rule)
        need((self.budget is not None) == is_budget, "budget",
             "must be set exactly when prefill_schedule or gen_rule is 'budget'")
        if self.budget is not None:
            need(0 < self.budget <= 1, "budget", "must lie in (0, 1] (a fraction of the full cache)")
        object.__setattr__(self, "recency_weight", tuple(float(w) for w in self.recency_weight))

    @property
    def selects_in_prefill(self) -> bool:
        return self.prefill_schedule != "none"

    @property
    def keeps_rows(self) -> bool:
        """Generation scores with the ring of the last W attention rows."""
        return self.gen_rule != "none" and self.scorer == "window"

    @property
    def keeps_accumulated(self) -> bool:
        """Generation scores with each slot's attention summed over every query so far."""
        return self.gen_rule != "none" and self.scorer == "accumulated"

    @classmethod
    def full(cls) -> "PyramidConfig":
        return cls(name="full", prefill_schedule="none", gen_rule="none")


# "<family>-F": the whole cache <= F of the full cache at the request's lengths, every family evicting under
# the same budget rule, window and sinks, so comparisons are at equal memory and differ only in what is named.
FAMILIES = {
    "budget": dict(),  # PyramidInfer: hidden-state pruning in prefill, cosine budgets, recent-window scores
    "streaming": dict(prune_hidden=False, budget_profile="uniform", scorer="recency"),  # StreamingLLM
    "h2o": dict(prune_hidden=False, budget_profile="uniform", scorer="accumulated"),  # H2O
    "snapkv": dict(prune_hidden=False, budget_profile="uniform", recency_weight=(1.0, 1.0), pool_kernel=7),
    "pyramidkv": dict(prune_hidden=False, budget_profile="linear", recency_weight=(1.0, 1.0), pool_kernel=7),
}


def cache_preset(name: str) -> PyramidConfig:
    """Named policies: "full", "paper" (the reference settings), "budget-F" (PyramidInfer, whole cache <= F of
    full) and the same-budget baselines "streaming-F", "h2o-F", "snapkv-F", "pyramidkv-F"; any of them with
    field overrides after a colon, e.g. "budget-0.45:budget_profile=uniform,recent_ratio=0.1"."""
    base, colon, overrides = name.partition(":")
    policy = _named(base)
    if colon:
        policy = dataclasses.replace(policy, name=name, **_parse_overrides(overrides, name))
    return policy


def _named(name: str) -> PyramidConfig:
    if name == "full":
        return PyramidConfig.full()
    if name == "paper":
        return PyramidConfig(name="paper")
    family, _, frac = name.rpartition("-")
    if family in FAMILIES:
        try:
            budget = float(frac)
        except ValueError:
            budget = None
        if budget is not None:
            return PyramidConfig(name=name, prefill_schedule="budget", gen_rule="budget", budget=budget,
                                 **FAMILIES[family])
    raise ValueError(f"unknown cache preset {name!r}; use 'full', 'paper' or '<family>-F' with family one of "
                     f"{', '.join(FAMILIES)} and F in (0, 1] (e.g. 'budget-0.45'), optionally followed by "
                     "':field=value,...', or pass a PyramidConfig")


def _parse_overrides(text: str, spec: str) -> dict:
    fields = {f.name for f in dataclasses.fields(PyramidConfig)} - {"name"}
    out = {}
    for item in re.split(r",(?=\s*\w+\s*=)", text):  # commas inside a tuple value do not split
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or key not in fields:
            raise ValueError(f"cache preset {spec!r}: {item.strip()!r} is not 'field=value' with a PyramidConfig "
                             f"field ({', '.join(sorted(fields))})")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a bare word, e.g. scorer=accumulated
    return out


# ---------------------------------------------------------------------------------------------------------
# Static per-layer lengths (pure Python: they depend only on lengths and the policy, never on attention)

def window_size(policy: PyramidConfig, prompt_len: int) -> int:
    return min(prompt_len, 1 + math.floor(policy.recent_ratio * prompt_len))


def gen_keep_counts(policy: PyramidConfig, num_layers: int) -> list[int]:
    """Reference rule: how many of each block of `gen_block` generated tokens layer l keeps."""
    g = [0.9 * (math.cos(math.pi * l / num_layers) + 1) / 2 + 0.1 for l in range(num_layers)]
    return [max(math.floor(policy.gen_block * policy.gen_decay * gl), 1) for gl in g]


def budget_capacities(policy: PyramidConfig, prompt_len: int, max_new: int, num_layers: int) -> list[int]:
    """Per-layer budgets (tokens) whose sum is <= budget * L * (S + T), never growing with depth.

    With `prune_hidden`, layer 0 holds the whole prompt plus one block (every prompt token enters layer 0).
    The other layers share the rest by `budget_profile`, each at least the smallest workable size (sinks +
    window + two blocks): "pyramid" falls along a cosine, "linear" along a line (both symmetric about the
    mean), "uniform" is flat."""
    S, T, L, E = prompt_len, max_new, num_layers, policy.gen_block
    full = S + T
    lo = min(full, policy.num_sinks + window_size(policy, S) + 2 * E)
    fixed = [min(full, S + E)] if policy.prune_hidden else []
    n = L - len(fixed)
    total = math.floor(policy.budget * L * full)
    mean = (total - sum(fixed)) / max(n, 1)
    if n and mean < lo:
        need = (lo * n + sum(fixed)) / (L * full)
        raise ValueError(
            f"PyramidConfig.budget={policy.budget} is too small for a {S}-token prompt + {T} new tokens over "
            f"{L} layers: each layer needs at least sinks + window + 2 blocks = {lo} tokens"
            f"{' and layer 0 the whole prompt' if fixed else ''}; use a budget >= {need:.3f} or a smaller "
            "recent_ratio / gen_block")
    shape = {"pyramid": lambda i: (math.cos(math.pi * i / max(n - 1, 1)) + 1) / 2,
             "linear": lambda i: 1 - i / max(n - 1, 1),
             "uniform": lambda i: 0.5}[policy.budget_profile]
    caps = list(fixed)
    for i in range(n):
        c = min(full, math.floor(lo + 2 * (mean - lo) * shape(i)))
        c = max(lo, c - c % policy.length_bucket)  # bucketed lengths; rounding down keeps within budget
        caps.append(min(c, caps[-1]) if caps else c)  # never deeper-is-larger
    return caps


def prefill_lengths(policy: PyramidConfig, prompt_len: int, num_layers: int,
                    caps: list[int] | None = None) -> list[int]:
    """How many prompt tokens each layer caches after prefill. With `prune_hidden` these are also the tokens
    entering the layer; without it every layer sees the whole prompt and only its cache is cut."""
    S, L = prompt_len, num_layers
    if policy.prefill_schedule == "none":
        return [S] * L
    W = window_size(policy, S)
    if policy.prefill_schedule == "budget":  # one block of room left for generation before the first eviction
        if not policy.prune_hidden:
            return [min(S, c - policy.gen_block) for c in caps]
        out = [S]
        for l in range(1, L):
            out.append(min(out[-1], caps[l] - policy.gen_block))
        return out
    # "cosine": the reference's compounding schedule over the context (tokens outside the window).
    r = policy.decay_ratio
    ctx, stopped, out = S - W, False, [S]
    for l in range(L - 1):
        if l >= 1 and not stopped:
            n = math.floor(ctx * ((1 - r) * (math.cos(math.pi * l / L) + 1) / 2 + r))
            if n <= min(policy.min_context, S - 1 - W):
                stopped = True
            else:
                ctx = n
        out.append(ctx + W)
    return out


def reference_capacity(n_prefill: int, prompt_len: int, max_new: int, window: int, block: int, keep: int) -> int:
    """Largest length a layer reaches under the reference generation rule (simulated step by step, in the
    same order as `decode_step`: evict, then append)."""
    length, upto, best = n_prefill, prompt_len, n_prefill
    for t in range(max_new):
        p = prompt_len + t
        if upto + block - 1 <= p - window:
            length -= block - keep
            upto += block
        length += 1
        best = max(best, length)
    return best


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Static shapes of one bucket: hashable, a static argument of the compiled programs."""
    policy: PyramidConfig
    prompt_bucket: int
    new_bucket: int
    window: int  # static number of window rows (the bucket's window; each sequence's own is <= this)
    prefill: tuple[int, ...]  # slots entering layer l in prefill (bucketed; may exceed the capacity)
    capacity: tuple[int, ...]  # slots of layer l's cache
    evict: tuple[int, ...]  # tokens evicted per eviction event, per layer

    @property
    def num_layers(self) -> int:
        return len(self.capacity)


def layer_lengths(policy: PyramidConfig, prompt_len: int, max_new: int, num_layers: int):
    """(prefill lengths, capacities, evictions per event, budgets) for one prompt length."""
    L = num_layers
    caps = budget_capacities(policy, prompt_len, max_new, L) if policy.budget is not None else None
    pre = prefill_lengths(policy, prompt_len, L, caps)
    if policy.gen_rule == "none":
        return pre, [n + max_new for n in pre], [0] * L, [n + max_new for n in pre]
    if policy.gen_rule == "budget":
        return pre, caps, [policy.gen_block] * L, caps
    W = window_size(policy, prompt_len)
    keep = gen_keep_counts(policy, L)
    cap = [reference_capacity(pre[l], prompt_len, max_new, W, policy.gen_block, keep[l]) for l in range(L)]
    return pre, cap, [policy.gen_block - k for k in keep], cap


def make_plan(policy: PyramidConfig, prompt_bucket: int, new_bucket: int, num_layers: int) -> CachePlan:
    pre, cap, evict, _ = layer_lengths(policy, prompt_bucket, new_bucket, num_layers)
    step = policy.prefill_bucket
    slots = ([min(prompt_bucket, -(-n // step) * step) for n in pre] if policy.prune_hidden
             else [prompt_bucket] * num_layers)
    return CachePlan(policy=policy, prompt_bucket=prompt_bucket, new_bucket=new_bucket,
                     window=window_size(policy, prompt_bucket), prefill=tuple(slots), capacity=tuple(cap),
                     evict=tuple(evict))


@struct.dataclass
class SeqPlan:
    """Per-sequence schedule, as data. keep[b, l]: prompt tokens of sequence b that layer l caches after
    prefill (with prune_hidden: the tokens entering layer l); budget[b, l]: its budget at layer l."""
    prompt_len: Int[Array, " B"]
    window: Int[Array, " B"]
    keep: Int[Array, "B L"]
    budget: Int[Array, "B L"]


def make_seq_plan(plan: CachePlan, prompt_lens: list[int], max_new: int) -> SeqPlan:
    rows = []
    for s in prompt_lens:
        pre, cap, _, budget = layer_lengths(plan.policy, s, max_new, plan.num_layers)
        if any(p > P for p, P in zip(pre, plan.prefill)) or any(c > C for c, C in zip(cap, plan.capacity)):
            raise AssertionError(f"a {s}-token prompt needs more slots than its bucket plan {plan}")
        rows.append((s, window_size(plan.policy, s), pre, budget))
    return SeqPlan(prompt_len=np.array([r[0] for r in rows], np.int32), window=np.array([r[1] for r in rows], np.int32),
                   keep=np.array([r[2] for r in rows], np.int32), budget=np.array([r[3] for r in rows], np.int32))


# ---------------------------------------------------------------------------------------------------------
# The cache pytree

@struct.dataclass
class LayerCache:
    k: Float[Array, "B K C hd"]
    v: Float[Array, "B K C hd"]
    pos: Int[Array, "B C"]  # original position of each slot, -1 when empty
    length: Int[Array, " B"]  # number of valid slots
    rows: Float[Array, "B W C"] | None  # head-averaged attention rows of the last W queries (ring by position)
    acc: Float[Array, "B C"] | None = None  # head-averaged attention summed over every query so far (H2O)


@struct.dataclass
class KVCache:
    layers: tuple[LayerCache, ...]
    seq: SeqPlan
    next_pos: Int[Array, " B"]  # position of the next token to be written
    row_pos: Int[Array, "B W"] | None  # query position of each ring row, -1 when empty or outside the window
    compressed_upto: Int[Array, " B"]  # reference rule: generated positions below this were already cut


def kv_bytes(cache: KVCache) -> list[int]:
    """Exact bytes of each layer's K and V arrays."""
    return [lc.k.nbytes + lc.v.nbytes for lc in cache.layers]


# ---------------------------------------------------------------------------------------------------------
# Scoring and selection (the window attention rows come from pallas_kernels.score_reduction.window_rows)

def recency_weights(row_pos: Int[Array, "B W"], newest: Int[Array, " B"], window: Int[Array, " B"],
                    weight: tuple[float, float]) -> Float[Array, "B W"]:
    """Row weights: linear from weight[0] (oldest window query) to weight[1] (newest), zero outside each
    sequence's window; divided by the window so that the weighted sum is the weighted mean over rows."""
    age = newest[:, None] - row_pos
    span = jnp.maximum(window - 1, 1)[:, None].astype(jnp.float32)
    w = weight[1] - (weight[1] - weight[0]) * age.astype(jnp.float32) / span
    inside = (row_pos >= 0) & (age >= 0) & (age < window[:, None])
    return jnp.where(inside, w, 0.0) / window[:, None].astype(jnp.float32)


def select_pivotal(scores: Float[Array, "B n"], pos: Int[Array, "B n"], seq: SeqPlan, keep: Int[Array, " B"],
                   num_sinks: int, out_len: int):
    """Prefill selection after one layer: per sequence, keep its sinks, its window and the top-scored context
    tokens, `keep[b]` tokens in all, in original order at the front of `out_len` slots.
    Returns (gather indices [B, out_len], new positions [B, out_len] with -1 for unused slots)."""
    n = pos.shape[1]
    valid = pos >= 0
    forced = (pos < num_sinks) | (pos >= (seq.prompt_len - seq.window)[:, None])
    priority = jnp.where(valid, jnp.where(forced, BIG, scores), -jnp.inf)
    _, idx = jax.lax.top_k(priority, out_len)  # best first; ties go to the earlier slot
    chosen = jnp.arange(out_len)[None, :] < keep[:, None]
    order = jnp.sort(jnp.where(chosen, idx, idx + n), axis=1)  # chosen first, each group in slot order
    idx = order % n
    new_pos = jnp.where(order < n, jnp.take_along_axis(pos, idx, axis=1), -1)
    return idx, new_pos


def pool_scores(scores: Float[Array, "B n"], kernel: int) -> Float[Array, "B n"]:
    """Max over each token's `kernel` neighbours (SnapKV's pooling: keeps a selected token's neighbours too).
    Prefill slots are in position order, so neighbouring slots are neighbouring tokens."""
    if kernel == 1:
        return scores
    return jax.lax.reduce_window(scores, -jnp.inf, jax.lax.max, (1, kernel), (1, 1),
                                 ((0, 0), (kernel // 2, kernel // 2)))


def evict(lc: LayerCache, scores: Float[Array, "B C"], candidate: jax.Array, trigger: jax.Array, n_evict: int):
    """Free the `n_evict` lowest-scored candidate slots of every triggered sequence: returns the layer's new
    (pos, length). Nothing moves: the slots are marked empty (pos -1) and the next tokens are written into
    them, so an eviction costs a top-k over the slot scores and a few scalar writes, never a pass over the
    keys and values. Non-candidates (sinks, window, protected blocks, empty slots) always stay."""
    idx = jax.lax.top_k(jnp.where(candidate, -scores, -BIG), n_evict)[1]  # top_k takes the largest
    b = jnp.arange(lc.pos.shape[0])[:, None]
    freed = jnp.where(trigger[:, None], -1, lc.pos[b, idx])
    return lc.pos.at[b, idx].set(freed), lc.length - jnp.where(trigger, n_evict, 0)
