"""KV cache as a pytree, and the cache policies (full, PyramidInfer and the same-engine baselines StreamingLLM,
H2O, SnapKV, PyramidKV) as data.

Layout invariants, for every layer and every sequence b:
  * after prefill, slots [0, length[b]) hold valid tokens in original order and the rest are empty (pos -1);
    generation writes each new token into the first empty slot, and eviction empties slots in place, so
    later the valid slots (length[b] of them) may be in any order: nothing depends on slot order;
  * `pos` is each token's original position; keys are stored after RoPE;
  * with per-KV-head selection every per-slot array (pos, rows, acc) and the length gain a KV-head axis after
    the batch: each head's slots follow the invariants above on their own.
Each layer's capacity is a static Python number computed from the prompt bucket, the generation bucket and
the policy (`CachePlan`), so one compiled program serves every request of a bucket. What differs between
sequences of one batch (prompt length, window, per-layer keep counts and budgets) is *data* (`SeqPlan`),
which is why a sequence's result never depends on its batch companions.

The full cache is the same machinery with nothing dropped: `PyramidConfig.full()`.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from pyrajax import validate
from pyrajax.config import ModelConfig

BIG = 3e38  # selection priority of tokens that must be kept (sinks, window)


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
    observe: with the "window" scorer, only the last `observe` queries' attention scores (None: the whole window;
        1: the newest query alone, as TOVA). The window of kept tokens stays 20% of the prompt.
    window_reduce: how the "window" scorer combines its observed queries: "mean" (recency-weighted, the
        reference) or "max" (a token needed by any one query counts: a needle the question attends to).
    value_weighted: multiply attention scores by the token's value norm (head-averaged ||v||, VATP): a token
        attended to but contributing nearly nothing to the output is a cheap one to drop.
    gen_scorer: the scorer of generation-phase eviction when it should differ from the prefill's (None: the
        same), e.g. window scores to choose the prompt's tokens and accumulated attention to evict during
        decoding (the strongest for language modelling, SPEC section 5).
    prune_from, propagate: decouple what goes deeper from what is cached (with prune_hidden and budgets).
        Every token goes through the first round(prune_from * L) layers, and a layer's input is never cut below
        `propagate` times its own cache; each layer then selects its cache from the tokens that reached it
        (FastKV-style late pruning). prune_from=0, propagate=1 is PyramidInfer: a layer caches what enters it.
    budget_profile: how the budget is spread over layers: "pyramid" (cosine, high to low), "linear" (PyramidKV)
        or "uniform" (the same budget at every layer). Under coupled pruning (`layer0_holds_prompt`) layer 0
        holds the whole prompt.
    scorer: what a token's importance is. "window": the recency-weighted mean attention of the last W queries
        (max-pooled over `pool_kernel` neighbouring keys in prefill when > 1, as SnapKV); "accumulated": the
        attention summed over every query so far (H2O's heavy hitters); "recency": its position (StreamingLLM:
        sinks + the most recent tokens). Every scorer averages over heads: one index set per layer serves
        every KV head, so one gather moves a layer's keys and values (unless `per_head`).
    per_head: each KV head of a layer's cache keeps its own token set (positions and validity per head,
        [B, K, C]). A KV head's attention row is the max over its query-head group's rows (a token that any
        of the group's heads needs counts), and every scorer (window, pooled, value-weighted, accumulated)
        runs on those rows; eviction is per head. The tokens whose hidden states go deeper stay ONE set, by
        the max over the KV heads of their scores. Off: one set per layer, as the reference.
    head_budget: with `per_head`, how a layer's tokens are split over its KV heads: "uniform" (each head keeps
        the layer's keep count) or "adaptive" (AdaKV: the K * keep tokens go by one top-k over all (head,
        token) scores, each head keeping its sinks, window and protected tokens plus at least `head_floor` of
        the uniform share of context tokens, and at most `head_ceiling` times the uniform count). The cache
        allocates every head the ceiling's slots, so adaptive costs memory: the KV bytes counted are the
        allocated slots (the padding included). In generation each head keeps the count prefill gave it
        (it evicts a block whenever it is one block above it, as every head of the layer at once).
        Adaptive splits only where a layer's cache selects among the tokens that reached it (prune_hidden
        off, or decoupled propagation with more tokens entering than kept). Per-head decode scoring keeps
        its state per KV head: K times the memory of the window scorer's ring of rows ([B, K, W, C]).
    budget: a float in (0, 1] is a fraction of the full cache at the request's lengths (prompt + new tokens);
        an int >= 16 is a token budget: the layers share budget * num_layers tokens.
    min_tokens: the floor. No layer's cache is cut below it, and a request whose prompt + new tokens fit
        under it is not compressed at all (0 = off). A token budget below the floor lowers it to the budget.
    max_window: at most this many recent tokens form the window (None: no cap for fraction budgets). A token
        budget also caps it at a quarter of the mean layer budget, so a long prompt's window cannot eat the budget.
    protect_tail: budget policies never evict a prompt's last `protect_tail` tokens when no protect mask is
        given (a chat conversation brings its own: see `pyrajax.prompts`); protect_last_turn: how much of a
        conversation's last user turn its mask protects (its most recent tokens). Protected tokens count
        inside the budget. The reference schedules ("cosine", "reference") keep their exact semantics and
        protect nothing beyond the sinks.
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
    budget: float | int | None = None
    min_tokens: int = 256
    max_window: int | None = None
    protect_tail: int = 32
    protect_last_turn: int = 64
    prune_hidden: bool = True
    prune_from: float = 0.0
    propagate: float = 1.0
    budget_profile: str = "pyramid"
    scorer: str = "window"
    pool_kernel: int = 1
    observe: int | None = None
    window_reduce: str = "mean"
    value_weighted: bool = False
    gen_scorer: str | None = None
    per_head: bool = False
    head_budget: str = "uniform"
    head_floor: float = 0.2
    head_ceiling: float = 1.5
    length_bucket: int = 8
    # Slots entering each layer in prefill are rounded up to a multiple of this (the extra slots are empty):
    # few distinct matmul shapes compile (and autotune) far faster than one per layer.
    prefill_bucket: int = 64

    def __post_init__(self):
        def need(ok, field, allowed):
            if not ok:
                raise ValueError(f"PyramidConfig.{field}={getattr(self, field)!r} is invalid: {allowed}")
        real, count = validate.is_real, validate.is_int
        need(real(self.recent_ratio) and 0 < self.recent_ratio <= 1, "recent_ratio", "must lie in (0, 1]")
        weights = self.recency_weight
        need(isinstance(weights, (tuple, list)) and len(weights) == 2 and all(map(real, weights))
             and 0 < weights[0] <= weights[1], "recency_weight", "must be (first, last) with 0 < first <= last")
        need(count(self.num_sinks) and self.num_sinks >= 0, "num_sinks", "must be an int >= 0")
        need(self.prefill_schedule in ("none", "cosine", "budget"), "prefill_schedule",
             "must be 'none', 'cosine' or 'budget'")
        need(real(self.decay_ratio) and 0 < self.decay_ratio <= 1, "decay_ratio", "must lie in (0, 1]")
        need(count(self.min_context) and self.min_context >= 0, "min_context", "must be an int >= 0")
        need(self.gen_rule in ("none", "reference", "budget"), "gen_rule",
             "must be 'none', 'reference' or 'budget'")
        need(count(self.gen_block) and self.gen_block >= 1, "gen_block", "must be an int >= 1")
        need(real(self.gen_decay) and 0 < self.gen_decay <= 1, "gen_decay", "must lie in (0, 1]")
        need(isinstance(self.prune_hidden, bool), "prune_hidden", "must be True or False")
        need(real(self.prune_from) and 0 <= self.prune_from < 1, "prune_from",
             "must lie in [0, 1)")
        need(real(self.propagate) and self.propagate >= 1, "propagate", "must be >= 1")
        need(not self.decoupled or (self.prune_hidden and self.prefill_schedule == "budget"), "propagate",
             "decoupled propagation (prune_from > 0 or propagate > 1) needs prune_hidden and prefill_schedule='budget'")
        need(self.budget_profile in ("pyramid", "linear", "uniform"), "budget_profile",
             "must be 'pyramid', 'linear' or 'uniform'")
        need(self.scorer in ("window", "accumulated", "recency"), "scorer",
             "must be 'window', 'accumulated' or 'recency'")
        need(self.gen_scorer in (None, "window", "accumulated", "recency"), "gen_scorer",
             "must be None (the prefill's scorer), 'window', 'accumulated' or 'recency'")
        need(self.window_reduce in ("mean", "max"), "window_reduce", "must be 'mean' or 'max'")
        need(isinstance(self.value_weighted, bool), "value_weighted", "must be True or False")
        need(not self.value_weighted or "recency" not in (self.scorer, self.decode_scorer), "value_weighted",
             "weights attention scores: it needs the 'window' or 'accumulated' scorer, not 'recency'")
        need(count(self.pool_kernel) and self.pool_kernel >= 1 and self.pool_kernel % 2 == 1,
             "pool_kernel", "must be an odd int >= 1")
        need(self.observe is None or (count(self.observe) and self.observe >= 1), "observe",
             "must be None or an int >= 1")
        need(isinstance(self.per_head, bool), "per_head", "must be True or False")
        need(self.head_budget in ("uniform", "adaptive"), "head_budget", "must be 'uniform' or 'adaptive'")
        need(self.head_budget == "uniform" or (self.per_head and self.prefill_schedule == "budget"), "head_budget",
             "'adaptive' needs per_head=True and prefill_schedule='budget'")
        need(real(self.head_floor) and 0 <= self.head_floor <= 1, "head_floor", "must lie in [0, 1]")
        need(real(self.head_ceiling) and 1 <= self.head_ceiling <= 16, "head_ceiling", "must lie in [1, 16]")
        for f in ("length_bucket", "prefill_bucket"):
            need(count(getattr(self, f)) and getattr(self, f) >= 1, f, "must be an int >= 1")
        is_budget = "budget" in (self.prefill_schedule, self.gen_rule)
        need((self.budget is not None) == is_budget, "budget",
             "must be set exactly when prefill_schedule or gen_rule is 'budget'")
        # Budget eviction starts from a cache that prefill filled to one block below the budget; any other
        # prefill schedule can leave more prompt tokens in a layer than its budget has slots.
        need(self.gen_rule != "budget" or self.prefill_schedule == "budget", "gen_rule",
             "'budget' needs prefill_schedule='budget' (another prefill schedule can cache more prompt tokens "
             "than the layer's budget)")
        if self.budget is not None:
            need(not isinstance(self.budget, bool) and isinstance(self.budget, (int, float)), "budget",
                 "must be a fraction in (0, 1] (a float) or a token budget (an int >= 16)")
            if isinstance(self.budget, float):
                need(0 < self.budget <= 1, "budget", "must lie in (0, 1] when a fraction (a float)")
            else:
                need(self.budget >= 16, "budget", "must be >= 16 when a token budget (an int); for a fraction "
                                                  "write it with a decimal point, e.g. 1.0")
        need(count(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be an int >= 0")
        for f in ("protect_tail", "protect_last_turn"):
            need(count(getattr(self, f)) and getattr(self, f) >= 0, f, "must be an int >= 0")
        need(self.max_window is None or (count(self.max_window) and self.max_window >= 1),
             "max_window", "must be None or an int >= 1")
        if self.budget is not None and not self.budget_is_fraction:
            need(self.budget >= self._least_tokens(self.budget), "budget",
                 f"a token budget must hold sinks ({self.num_sinks}) + window (up to {self.window_cap}) + the "
                 f"protected tail ({self.protect_tail}) + two eviction blocks ({2 * self.gen_block}): use a budget "
                 f">= {self._smallest_token_budget()}, or fewer sinks, a smaller max_window, protect_tail or gen_block")
        object.__setattr__(self, "recency_weight", tuple(float(w) for w in self.recency_weight))

    def _token_budget_window(self, budget: int) -> int:
        """The window cap under token budget `budget`: a quarter of it (the window never eats the budget), and
        at most max_window."""
        quarter = max(1, budget // 4)
        return quarter if self.max_window is None else min(self.max_window, quarter)

    def _least_tokens(self, budget: int) -> int:
        return self.num_sinks + self._token_budget_window(budget) + self.protect_tail + 2 * self.gen_block

    def _smallest_token_budget(self) -> int:
        b = 16
        while b < self._least_tokens(b):  # the window cap grows with the budget: iterate to the fixed point
            b = self._least_tokens(b)
        return b

    @property
    def budget_is_fraction(self) -> bool:
        return isinstance(self.budget, float)

    @property
    def floor_tokens(self) -> int:
        """The floor in effect: min_tokens, lowered to a token budget below it."""
        if self.budget is not None and not self.budget_is_fraction:
            return min(self.min_tokens, self.budget)
        return self.min_tokens

    @property
    def window_cap(self) -> int:
        """Most tokens the recent window may hold (0 = no cap)."""
        if self.budget is not None and not self.budget_is_fraction:
            return self._token_budget_window(self.budget)
        return self.max_window if self.max_window is not None else 0

    @property
    def decoupled(self) -> bool:
        """Layers may cache fewer tokens than enter them while pruning hidden states."""
        return self.prune_from > 0 or self.propagate > 1

    @property
    def layer0_holds_prompt(self) -> bool:
        """PyramidInfer proper (hidden-state pruning from the first layer, a layer caches what enters it): layer
        0 caches the whole prompt, which every deeper layer's tokens are chosen from. With decoupled
        propagation each layer selects its own cache from the tokens that reached it, layer 0 included."""
        return self.prune_hidden and not self.decoupled

    @property
    def adaptive(self) -> bool:
        """KV heads of a layer split its tokens unevenly (AdaKV)."""
        return self.per_head and self.head_budget == "adaptive"

    @property
    def protects(self) -> bool:
        """Whether protect masks apply (budget policies only)."""
        return self.prefill_schedule == "budget"

    @property
    def selects_in_prefill(self) -> bool:
        return self.prefill_schedule != "none"

    @property
    def decode_scorer(self) -> str:
        """The scorer of generation-phase eviction."""
        return self.gen_scorer or self.scorer

    @property
    def keeps_rows(self) -> bool:
        """Generation scores with the ring of the last W attention rows."""
        return self.gen_rule != "none" and self.decode_scorer == "window"

    @property
    def keeps_accumulated(self) -> bool:
        """Generation scores with each slot's attention summed over every query so far."""
        return self.gen_rule != "none" and self.decode_scorer == "accumulated"

    @classmethod
    def full(cls) -> "PyramidConfig":
        return cls(name="full", prefill_schedule="none", gen_rule="none")


# "<family>-<B>": every family evicting under the same budget rule (a fraction of the full cache at the
# request's lengths, or tokens per layer), window, sinks and floor, so comparisons are at equal memory and
# differ only in what is named.
FAMILIES = {
    "budget": dict(),  # PyramidInfer: hidden-state pruning in prefill, cosine budgets, recent-window scores
    "streaming": dict(prune_hidden=False, budget_profile="uniform", scorer="recency"),  # StreamingLLM
    "h2o": dict(prune_hidden=False, budget_profile="uniform", scorer="accumulated"),  # H2O
    # SnapKV as published: the last 32 queries observe, pooled over 7 keys; a window of at most 64 recent tokens
    # kept (20 % of a 2k prompt scored 39 RULER points against 69, H200 grid)
    "snapkv": dict(prune_hidden=False, budget_profile="uniform", recency_weight=(1.0, 1.0), pool_kernel=7,
                   observe=32, max_window=64),
    "pyramidkv": dict(prune_hidden=False, budget_profile="linear", recency_weight=(1.0, 1.0), pool_kernel=7,
                      observe=32, max_window=64),
    # pyrajax's own: still PyramidInfer (deeper layers compute on fewer tokens, chosen by attention), with the
    # settings that won the H200 grid (bench/results/quality-smollm2-135m-instruct.json, README "Quality"):
    # every token goes through the first half of the layers; from there each layer's input is cut to 1.5 times
    # its cache (prefill FLOPs about 0.84 of the full cache's at 45 %, 0.56 at 256 tokens) and each layer selects
    # its own cache from what reached it. Importance is the attention of the last 32 queries (the question's
    # tokens), max-pooled over 21 neighbouring keys, in prefill and decoding, and the kept window is at most 64
    # tokens. Pooling keeps a whole needle sentence rather than its single strongest token; at 45 % KV the
    # ruler-aware average went 75.5 (the newest query alone, no pooling) -> 87.5 (pooled) -> 98.5 (32 queries,
    # pooled), and ppl-2048 24.37 -> 24.29 -> 24.15.
    "pyramid": dict(prune_from=0.5, propagate=1.5, budget_profile="uniform", scorer="window", observe=32,
                    pool_kernel=21, recency_weight=(1.0, 1.0), max_window=64),
    # AdaKV-SnapKV: SnapKV's scores per KV head, a layer's tokens split over its heads by one top-k. Every head
    # is allocated the ceiling's slots, so its measured KV exceeds the nominal budget (0.67 at "adakv-0.45")
    "adakv": dict(prune_hidden=False, budget_profile="uniform", recency_weight=(1.0, 1.0), pool_kernel=7,
                  observe=32, max_window=64, per_head=True, head_budget="adaptive"),
    # TOVA: the newest query's head-averaged attention decides (here in blocks of gen_block, like every family)
    # (a window of at most 64 tokens: 79 RULER points against 75.5 with 20 % of the prompt)
    "tova": dict(prune_hidden=False, budget_profile="uniform", recency_weight=(1.0, 1.0), observe=1, max_window=64),
}


def cache_preset(name: str) -> PyramidConfig:
    """Named policies: "full", "paper" (the reference settings), "budget-B" (PyramidInfer) and the same-budget
    baselines "streaming-B", "h2o-B", "snapkv-B", "pyramidkv-B", where B is a fraction of the full cache
    ("0.45") or a token budget per layer ("512"); any of them with field overrides after a colon, separated by
    commas or colons, e.g. "budget-0.45:budget_profile=uniform,recent_ratio=0.1", "h2o-512:min_tokens=0" or
    "pyramid-0.45:per_head=true:head_budget=adaptive"."""
    if not isinstance(name, str):
        raise ValueError(f"cache preset must be a name such as 'full' or 'budget-0.45', got {validate.describe(name)}")
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
    family, _, amount = name.rpartition("-")
    if family in FAMILIES:
        # "0.45" (a decimal point) is a fraction of the full cache, "512" (digits only) a token budget.
        budget = (float(amount) if re.fullmatch(r"\d*\.\d+|\d+\.\d*", amount, re.ASCII)
                  else int(amount) if re.fullmatch(r"\d+", amount, re.ASCII) else None)
        if budget is not None:
            return PyramidConfig(name=name, prefill_schedule="budget", gen_rule="budget", budget=budget,
                                 **FAMILIES[family])
    raise ValueError(f"unknown cache preset {name!r}; use 'full', 'paper' or '<family>-<B>' with family one of "
                     f"{', '.join(FAMILIES)} and B a fraction of the full cache in (0, 1] (e.g. 'budget-0.45') "
                     "or a token budget per layer >= 16 (e.g. 'budget-512'), optionally followed by "
                     "':field=value,...', or pass a PyramidConfig")


def _parse_overrides(text: str, spec: str) -> dict:
    fields = {f.name for f in dataclasses.fields(PyramidConfig)} - {"name"}
    out = {}
    for item in re.split(r"[,:](?=\s*\w+\s*=)", text):  # commas inside a tuple value do not split
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or key not in fields:
            raise ValueError(f"cache preset {spec!r}: {item.strip()!r} is not 'field=value' with a PyramidConfig "
                             f"field ({', '.join(sorted(fields))})")
        if value.lower() in ("true", "false"):  # as a URL or a shell would write a bool
            out[key] = value.lower() == "true"
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a bare word, e.g. scorer=accumulated
    return out


# ---------------------------------------------------------------------------------------------------------
# Static per-layer lengths (pure Python: they depend only on lengths and the policy, never on attention)

def window_size(policy: PyramidConfig, prompt_len: int) -> int:
    """W = 1 + floor(recent_ratio * S), at most the prompt and at most the policy's window cap."""
    return min(prompt_len, 1 + math.floor(policy.recent_ratio * prompt_len), policy.window_cap or prompt_len)


def gen_keep_counts(policy: PyramidConfig, num_layers: int) -> list[int]:
    """Reference rule: how many of each block of `gen_block` generated tokens layer l keeps."""
    g = [0.9 * (math.cos(math.pi * l / num_layers) + 1) / 2 + 0.1 for l in range(num_layers)]
    return [max(math.floor(policy.gen_block * policy.gen_decay * gl), 1) for gl in g]


def smallest_cache(policy: PyramidConfig, prompt_len: int, protected: int = 0) -> int:
    """The fewest slots a compressed layer may have: sinks + window + `protected` other protected tokens + two
    eviction blocks (so an eviction always finds `gen_block` candidates), and never below the floor."""
    need = policy.num_sinks + window_size(policy, prompt_len) + protected + 2 * policy.gen_block
    return max(need, policy.floor_tokens)


def protected_outside(policy: PyramidConfig, prompt_len: int, mask=None) -> int:
    """How many protected prompt tokens are not sinks (mask None: the policy's default, the last
    `protect_tail` tokens). Those in the prefill window count too: once generation moves the window on, they
    stay, and eviction must still find a block of candidates beside them."""
    if not policy.protects:
        return 0
    if mask is None:
        mask = default_protect(policy, prompt_len)
    return int(np.sum(np.asarray(mask)[policy.num_sinks:]))


def default_protect(policy: PyramidConfig, prompt_len: int) -> np.ndarray:
    mask = np.zeros(prompt_len, bool)
    if policy.protects and policy.protect_tail:
        mask[-policy.protect_tail:] = True
    return mask


def budget_capacities(policy: PyramidConfig, prompt_len: int, max_new: int, num_layers: int,
                      protected: int = 0) -> list[int]:
    """Per-layer budgets (tokens) of one request, never growing with depth.

    A fraction budget F shares F * L * (S + T) tokens over the layers, a token budget B shares B * L. Under
    PyramidInfer's coupled pruning (`layer0_holds_prompt`), layer 0 holds the whole prompt plus one block. The
    other layers share the rest by `budget_profile` ("pyramid" falls along a cosine, "linear" along a line,
    both symmetric about the mean; "uniform" is flat). No layer gets less than `smallest_cache` (sinks, window,
    two blocks, the floor) or more than the request needs; a request that fits under that minimum is not
    compressed at all. So the budget is a ceiling that short requests may exceed: the measured KV says by how
    much."""
    S, T, L, E = prompt_len, max_new, num_layers, policy.gen_block
    full = S + T
    lo = smallest_cache(policy, S, protected)
    if full <= lo:
        return [full] * L
    # Layer 0's size does not depend on T (S + E even when T < E), so deeper budgets never shrink as T grows.
    fixed = [max(lo, S + E)] if policy.layer0_holds_prompt else []
    n = L - len(fixed)
    total = math.floor(policy.budget * L * full) if policy.budget_is_fraction else policy.budget * L
    mean = max((total - sum(fixed)) / max(n, 1), lo)
    shape = {"pyramid": lambda i: (math.cos(math.pi * i / max(n - 1, 1)) + 1) / 2,
             "linear": lambda i: 1 - i / max(n - 1, 1),
             "uniform": lambda i: 0.5}[policy.budget_profile]
    caps = [min(c, full) for c in fixed]
    for i in range(n):
        c = min(full, math.floor(lo + 2 * (mean - lo) * shape(i)))
        c = max(lo, c - c % policy.length_bucket)  # bucketed lengths; rounding down keeps within budget
        caps.append(min(c, caps[-1]) if caps else c)  # never deeper-is-larger
    return caps


def cosine_prefill_lengths(policy: PyramidConfig, prompt_len: int, num_layers: int) -> list[int]:
    """The reference's compounding schedule: tokens entering each layer (the context outside the window
    shrinks by s_l per layer, until a cut would reach min(min_context, S - 1 - W); then it stops for good)."""
    S, L, r = prompt_len, num_layers, policy.decay_ratio
    W = window_size(policy, S)
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


def budget_entering_lengths(policy: PyramidConfig, prompt_len: int, max_new: int, caps: list[int]) -> list[int]:
    """Prompt tokens entering each layer in prefill under budgets `caps`. Without hidden-state pruning, all of
    them. With it, never more than the layer above, never fewer than `propagate` times the layer's own cache
    (what `budget_prefill_lengths` would keep), and all of them above layer round(prune_from * L)."""
    S, L = prompt_len, len(caps)
    if not policy.prune_hidden:
        return [S] * L
    own = _own_keep(policy, S, max_new, caps)
    first = max(1, round(policy.prune_from * L))
    out = [S]
    for l in range(1, L):
        want = S if l < first else min(S, math.ceil(policy.propagate * own[l]))
        out.append(min(out[-1], want))
    return out


def _own_keep(policy: PyramidConfig, prompt_len: int, max_new: int, caps: list[int]) -> list[int]:
    """Everything where the whole request fits under the layer's budget, else one block of room below it."""
    S, E = prompt_len, policy.gen_block
    return [S if c >= S + max_new else min(S, c - E) for c in caps]


def budget_prefill_lengths(policy: PyramidConfig, prompt_len: int, max_new: int, caps: list[int]) -> list[int]:
    """Prompt tokens each layer caches after prefill under budgets `caps`: everything where the whole request
    fits, else one block of room below the budget for generation before the first eviction; with
    `prune_hidden`, never more than enter the layer (PyramidInfer: exactly those)."""
    own = _own_keep(policy, prompt_len, max_new, caps)
    return [min(n, e) for n, e in zip(own, budget_entering_lengths(policy, prompt_len, max_new, caps))]


def entering_lengths(policy: PyramidConfig, prompt_len: int, max_new: int, num_layers: int,
                     protected: int | None = None) -> list[int]:
    """Prompt tokens entering each layer in prefill (with prune_hidden the others' hidden states were dropped)."""
    if policy.prefill_schedule == "budget" and policy.prune_hidden:
        if protected is None:
            protected = protected_outside(policy, prompt_len)
        caps = budget_capacities(policy, prompt_len, max_new, num_layers, protected)
        return budget_entering_lengths(policy, prompt_len, max_new, caps)
    if policy.prefill_schedule == "cosine" and policy.prune_hidden:
        return cosine_prefill_lengths(policy, prompt_len, num_layers)
    return [prompt_len] * num_layers


def reference_capacity(n_prefill: int, prompt_len: int, max_new: int, window: int, block: int, keep: int) -> int:
    """Largest length a layer reaches under the reference generation rule, in the order of `decode_step`
    (evict, then append), in closed form. After step t (0-based) the layer holds n + t + 1 - d * c(t) tokens,
    d = block - keep tokens cut per event and c(t) = max(0, (t - window + 1) // block) events so far. Each
    block adds block - d >= 1 tokens net, so the maximum is at the last step or just before the last cut."""
    T, W, E, d = max_new, window, block, block - keep
    if T <= 0:
        return n_prefill
    cuts = max(0, (T - W) // E)  # c(T - 1)
    best = T - d * cuts  # after the last step
    if cuts:  # just before the last cut, at step t_K - 1 with t_K = W + cuts * E - 1
        best = max(best, W + cuts * E - 1 - d * (cuts - 1))
    return n_prefill + best


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


def layer_lengths(policy: PyramidConfig, prompt_len: int, max_new: int, num_layers: int,
                  protected: int | None = None):
    """(prefill lengths, capacities, evictions per event, budgets) for one request with `protected` protected
    tokens outside sinks and window (None: the policy's default mask). Prefill lengths and budgets are per
    KV head; with adaptive head budgets the capacity has room for the fullest head (`head_ceiling_count`)."""
    if protected is None:
        protected = protected_outside(policy, prompt_len)
    pre, cap, evict, budget = _uniform_layer_lengths(policy, prompt_len, max_new, num_layers, protected)
    if policy.adaptive:  # each head grows and shrinks as the uniform count would, from its own prefill count
        enter = entering_lengths(policy, prompt_len, max_new, num_layers, protected)
        cap = [c + head_ceiling_count(policy, k, e) - k for c, k, e in zip(cap, pre, enter)]
    return pre, cap, evict, budget


def head_ceiling_count(policy: PyramidConfig, keep: int, enter: int) -> int:
    """Adaptive head budgets: the most prompt tokens one KV head of a layer may keep after prefill, when the
    uniform count is `keep` of the `enter` tokens that reached the layer. In float32 arithmetic, as the
    compiled selection computes it from the same numbers, so the two agree to the token."""
    return min(enter, math.floor(np.float32(policy.head_ceiling) * np.float32(keep)))


def _uniform_layer_lengths(policy: PyramidConfig, prompt_len: int, max_new: int, num_layers: int, protected: int):
    L = num_layers
    if policy.prefill_schedule == "budget" or policy.gen_rule == "budget":
        caps = budget_capacities(policy, prompt_len, max_new, L, protected)
    if policy.prefill_schedule == "none":
        pre = [prompt_len] * L
    elif policy.prefill_schedule == "cosine":
        pre = cosine_prefill_lengths(policy, prompt_len, L)
    else:
        pre = budget_prefill_lengths(policy, prompt_len, max_new, caps)
    if policy.gen_rule == "none":
        cap = [n + max_new for n in pre]
        return pre, cap, [0] * L, cap
    if policy.gen_rule == "budget":  # (validation ensures prefill_schedule "budget": pre fits under caps)
        return pre, caps, [policy.gen_block] * L, caps
    W = window_size(policy, prompt_len)
    keep = gen_keep_counts(policy, L)
    cap = [reference_capacity(pre[l], prompt_len, max_new, W, policy.gen_block, keep[l]) for l in range(L)]
    return pre, cap, [policy.gen_block - k for k in keep], cap


def compresses(policy: PyramidConfig, prompt_len: int, max_new: int, num_layers: int,
               protected: int | None = None) -> bool:
    """Whether the policy drops anything from this request: in prefill, or in generation."""
    pre, _, _, budget = layer_lengths(policy, prompt_len, max_new, num_layers, protected)
    if any(n < prompt_len for n in pre):
        return True
    if policy.gen_rule == "budget":  # (the budget, not the capacity: adaptive head budgets pad the capacity)
        return any(c < prompt_len + max_new for c in budget)
    if policy.gen_rule == "reference":  # the first cut comes once a whole generated block has left the window
        first_cut_step = window_size(policy, prompt_len) + policy.gen_block - 1
        return max_new > first_cut_step and min(gen_keep_counts(policy, num_layers)) < policy.gen_block
    return False


@functools.lru_cache(maxsize=64)
def _bucket_lengths(policy: PyramidConfig, prompt_bucket: int, new_bucket: int, num_layers: int):
    """Per layer, the most prefill tokens and slots that any prompt of 1..prompt_bucket tokens needs with
    new_bucket new tokens. (Not just the bucket's own length: with the reference schedule's early stop a
    shorter prompt can keep more tokens in deep layers than a longer one.)"""
    enter = [0] * num_layers
    cap = [0] * num_layers
    for s in range(1, prompt_bucket + 1):
        _, c, evict, _ = layer_lengths(policy, s, new_bucket, num_layers)
        enter = [max(a, b) for a, b in zip(enter, entering_lengths(policy, s, new_bucket, num_layers))]
        cap = [max(a, b) for a, b in zip(cap, c)]
    return enter, cap, evict


def make_plan(policy: PyramidConfig, prompt_bucket: int, new_bucket: int, num_layers: int,
              requests: tuple[tuple[int, ...], ...] = ()) -> CachePlan:
    """The static shapes of a bucket: every layer has room for any prompt of up to `prompt_bucket` tokens with
    `new_bucket` new tokens, and for each (prompt length, new tokens[, protected tokens]) in `requests`
    (fewer new tokens than the bucket, or a protect mask, can need other per-layer budgets; they rarely
    enlarge the plan)."""
    pre, cap, evict = _bucket_lengths(policy, prompt_bucket, new_bucket, num_layers)
    for s, t, *protected in requests:
        _, c, _, _ = layer_lengths(policy, s, t, num_layers, *protected)
        pre = [max(a, b) for a, b in zip(pre, entering_lengths(policy, s, t, num_layers, *protected))]
        cap = [max(a, b) for a, b in zip(cap, c)]
    step = policy.prefill_bucket
    slots = ([min(prompt_bucket, -(-n // step) * step) for n in pre] if policy.prune_hidden
             else [prompt_bucket] * num_layers)
    return CachePlan(policy=policy, prompt_bucket=prompt_bucket, new_bucket=new_bucket,
                     window=window_size(policy, prompt_bucket), prefill=tuple(slots), capacity=tuple(cap),
                     evict=tuple(evict))


@struct.dataclass
class SeqPlan:
    """Per-sequence schedule, as data. keep[b, l]: prompt tokens of sequence b that layer l caches after
    prefill; enter[b, l]: prompt tokens entering layer l (fewer than the prompt with prune_hidden; equal to
    keep for PyramidInfer); budget[b, l]: its budget at layer l;
    protect[b, p]: prompt position p of sequence b is never evicted (budget policies)."""
    prompt_len: Int[Array, " B"]
    window: Int[Array, " B"]
    keep: Int[Array, "B L"]
    enter: Int[Array, "B L"]
    budget: Int[Array, "B L"]
    protect: Bool[Array, "B S"]


def make_seq_plan(plan: CachePlan, prompt_lens: list[int], max_new: int | list[int], protect=None) -> SeqPlan:
    """The per-sequence schedules of a batch (`max_new`: one count for all, or one per sequence; `protect`:
    None, or per sequence a boolean mask over its prompt or None for the policy's default)."""
    n = len(prompt_lens)
    news = [max_new] * n if isinstance(max_new, int) else list(max_new)
    masks = [None] * n if protect is None else list(protect)
    rows = []
    pinned = np.zeros((n, plan.prompt_bucket), bool)
    for i, (s, t, mask) in enumerate(zip(prompt_lens, news, masks)):
        if mask is None:
            mask = default_protect(plan.policy, s)
        elif np.shape(mask) != (s,):
            raise ValueError(f"request {i}: its protect mask has shape {np.shape(mask)} for a {s}-token prompt")
        fits = s <= plan.prompt_bucket and t <= plan.new_bucket
        if fits:
            protected = protected_outside(plan.policy, s, mask)
            pre, cap, _, budget = layer_lengths(plan.policy, s, t, plan.num_layers, protected)
            enter = entering_lengths(plan.policy, s, t, plan.num_layers, protected)
            fits = (all(p <= P for p, P in zip(enter, plan.prefill))
                    and all(c <= C for c, C in zip(cap, plan.capacity)))
        if not fits:
            raise ValueError(f"request {i} ({s}-token prompt + {t} new tokens) does not fit the plan of its bucket "
                             f"({plan.prompt_bucket} + {plan.new_bucket}); build the plan with "
                             "make_plan(..., requests=...) covering it")
        if plan.policy.protects:
            pinned[i, :s] = mask
        rows.append((s, window_size(plan.policy, s), pre, enter, budget))
    col = lambda j: np.array([r[j] for r in rows], np.int32)
    return SeqPlan(prompt_len=col(0), window=col(1), keep=col(2), enter=col(3), budget=col(4), protect=pinned)


def per_seq(x: jax.Array, like: jax.Array) -> jax.Array:
    """A per-sequence array [B] shaped to broadcast against `like` ([B, n] or, per KV head, [B, K, n])."""
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def protected_slots(seq: SeqPlan, pos: Int[Array, "B *n"]) -> jax.Array:
    """Whether each slot holds a protected prompt token (pos's shape; empty slots and generated tokens: False)."""
    S = seq.protect.shape[1]
    flat = pos.reshape(pos.shape[0], -1)
    inside = (flat >= 0) & (flat < S)
    return (inside & jnp.take_along_axis(seq.protect, jnp.clip(flat, 0, S - 1), axis=1)).reshape(pos.shape)


def forced_slots(seq: SeqPlan, pos: Int[Array, "B *n"], num_sinks: int) -> jax.Array:
    """Prompt slots that prefill selection always keeps: sinks, the window and protected tokens."""
    return ((pos < num_sinks) | (pos >= per_seq(seq.prompt_len - seq.window, pos))
            | protected_slots(seq, pos))


# ---------------------------------------------------------------------------------------------------------
# The cache pytree

@struct.dataclass
class LayerCache:
    """One layer's cache. With per-KV-head selection (`PyramidConfig.per_head`) every per-slot array gains a
    KV-head axis after the batch: pos [B, K, C], length [B, K], rows [B, K, W, C], acc [B, K, C]."""
    k: Float[Array, "B K C hd"]
    v: Float[Array, "B K C hd"]
    pos: Int[Array, "B *K C"]  # original position of each slot, -1 when empty
    length: Int[Array, "B *K"]  # number of valid slots
    rows: Float[Array, "B *K W C"] | None  # attention rows of the last W queries (ring by position): the
    # mean over query heads, or per KV head the max over its group
    acc: Float[Array, "B *K C"] | None = None  # those rows summed over every query so far (H2O)
    head_budget: Int[Array, "B K"] | None = None  # adaptive head budgets: each KV head's generation budget


@struct.dataclass
class KVCache:
    layers: tuple[LayerCache, ...]
    seq: SeqPlan
    next_pos: Int[Array, " B"]  # position of the next token to be written
    row_pos: Int[Array, "B W"] | None  # query position of each ring row, -1 when empty or outside the window
    compressed_upto: Int[Array, " B"]  # reference rule: generated positions below this were already cut


def kv_bytes(cache: KVCache) -> list[int]:
    """Exact bytes of each layer's K and V arrays (allocated slots, empty ones included)."""
    return [lc.k.nbytes + lc.v.nbytes for lc in cache.layers]


def held_tokens(lc: LayerCache) -> jax.Array:
    """Tokens a layer holds per sequence [B]; per KV head, the mean over heads (the bytes of that many tokens'
    K and V at every head are what the heads hold together)."""
    return lc.length if lc.length.ndim == 1 else jnp.sum(lc.length, axis=-1) // lc.length.shape[-1]


# ---------------------------------------------------------------------------------------------------------
# Scoring and selection (the window attention rows come from pallas_kernels.score_reduction.window_rows).
# Scores, positions and keep counts are [B, n] / [B] for one token set per layer, or [B, K, n] / [B, K] per
# KV head; every function here serves both.

def recency_weights(row_pos: Int[Array, "B W"], newest: Int[Array, " B"], window: Int[Array, " B"],
                    weight: tuple[float, float], observe: int | None = None) -> Float[Array, "B W"]:
    """Row weights: linear from weight[0] (oldest observed query) to weight[1] (newest), zero outside each
    sequence's last min(window, observe) queries; divided by their count so that the weighted sum is the
    weighted mean over rows."""
    if observe is not None:
        window = jnp.minimum(window, observe)
    age = newest[:, None] - row_pos
    span = jnp.maximum(window - 1, 1)[:, None].astype(jnp.float32)
    w = weight[1] - (weight[1] - weight[0]) * age.astype(jnp.float32) / span
    inside = (row_pos >= 0) & (age >= 0) & (age < window[:, None])
    return jnp.where(inside, w, 0.0) / window[:, None].astype(jnp.float32)


def select_pivotal(scores: Float[Array, "B *K n"], pos: Int[Array, "B *K n"], seq: SeqPlan,
                   keep: Int[Array, "B *K"], num_sinks: int, out_len: int):
    """Prefill selection after one layer: per sequence (and KV head), keep its sinks, its window, its protected
    tokens and the top-scored context tokens, `keep` tokens in all, in original order at the front of
    `out_len` slots. Returns (gather indices, new positions with -1 for unused slots), [..., out_len]."""
    n = pos.shape[-1]
    valid = pos >= 0
    priority = jnp.where(valid, jnp.where(forced_slots(seq, pos, num_sinks), BIG, scores), -jnp.inf)
    _, idx = jax.lax.top_k(priority, out_len)  # best first; ties go to the earlier slot
    chosen = jnp.arange(out_len) < keep[..., None]
    order = jnp.sort(jnp.where(chosen, idx, idx + n), axis=-1)  # chosen first, each group in slot order
    idx = order % n
    new_pos = jnp.where(order < n, jnp.take_along_axis(pos, idx, axis=-1), -1)
    return idx, new_pos


def adaptive_head_counts(scores: Float[Array, "B K n"], pos: Int[Array, "B K n"], seq: SeqPlan,
                         keep: Int[Array, " B"], enter: Int[Array, " B"], policy: PyramidConfig) -> jax.Array:
    """AdaKV's split of a layer's K * keep tokens over its KV heads [B, K]. Every head keeps the forced tokens
    (sinks, window, protected: F of them) and at least floor(head_floor * (keep - F)) context tokens; the rest
    of the K * (keep - F) context tokens go by one top-k over every head's remaining context scores, at most
    head_ceiling_count(keep, enter) tokens per head. A head's scores are taken best first, so capping its
    rank caps its count; ties go to the lower head, then the better-ranked token."""
    B, K, n = scores.shape
    f32 = jnp.float32
    forced = forced_slots(seq, pos, policy.num_sinks) & (pos >= 0)
    context = (pos >= 0) & ~forced
    n_forced = jnp.sum(forced[:, 0], axis=-1)  # every head saw the same tokens: [B]
    share = jnp.maximum(keep - n_forced, 0)  # the uniform per-head context count
    least = jnp.floor(f32(policy.head_floor) * share.astype(f32)).astype(share.dtype)
    most = jnp.minimum(enter, jnp.floor(f32(policy.head_ceiling) * keep.astype(f32)).astype(keep.dtype)) - n_forced
    ranked = -jnp.sort(jnp.where(context, -scores, jnp.inf), axis=-1)  # each head's context scores, best first
    rank = jnp.arange(n)
    eligible = (rank >= least[:, None, None]) & (rank < most[:, None, None]) & (ranked > -jnp.inf)
    flat = jnp.where(eligible, ranked, -jnp.inf).reshape(B, K * n)
    order = jnp.argsort(-flat, axis=-1, stable=True)  # ties: the lower (head, rank) first
    place = jnp.zeros_like(order).at[jnp.arange(B)[:, None], order].set(jnp.arange(K * n)[None, :])
    extra = K * (share - least)
    picked = (place < extra[:, None]) & eligible.reshape(B, K * n)
    return n_forced[:, None] + least[:, None] + jnp.sum(picked.reshape(B, K, n), axis=-1, dtype=keep.dtype)


def window_scores(weights: Float[Array, "B W"], rows: Float[Array, "B *K W n"], reduce: str) -> jax.Array:
    """Combine the observed queries' attention rows: their weighted mean (weights from `recency_weights`), or
    their maximum over the rows of nonzero weight. [B, n], or [B, K, n] for per-KV-head rows."""
    if reduce == "mean":
        return jnp.einsum("bw,bwn->bn" if rows.ndim == 3 else "bw,bkwn->bkn", weights, rows)
    w = weights.reshape(weights.shape[:1] + (1,) * (rows.ndim - 3) + weights.shape[1:] + (1,))
    return jnp.max(jnp.where(w > 0, rows, 0.0), axis=-2)


def value_norms(v: Float[Array, "B K n hd"], per_head: bool = False) -> jax.Array:
    """Each slot's value norm in float32: averaged over KV heads [B, n], or per KV head [B, K, n]."""
    norms = jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=-1))
    return norms if per_head else jnp.mean(norms, axis=1)


def pool_scores(scores: Float[Array, "B *K n"], kernel: int) -> jax.Array:
    """Max over each token's `kernel` neighbours (SnapKV's pooling: keeps a selected token's neighbours too).
    Prefill slots are in position order, so neighbouring slots are neighbouring tokens."""
    if kernel == 1:
        return scores
    lead = (1,) * (scores.ndim - 1)
    return jax.lax.reduce_window(scores, -jnp.inf, jax.lax.max, lead + (kernel,), lead + (1,),
                                 ((0, 0),) * len(lead) + ((kernel // 2, kernel // 2),))


def evict(lc: LayerCache, scores: Float[Array, "B *K C"], candidate: jax.Array, trigger: jax.Array, n_evict: int):
    """Free the `n_evict` lowest-scored candidate slots of every triggered sequence (trigger [B]) or KV head
    (trigger [B, K]): returns the layer's new (pos, length). Nothing moves: the slots are marked empty (pos -1)
    and the next tokens are written into them, so an eviction costs a top-k over the slot scores and a few
    scalar writes, never a pass over the keys and values. Non-candidates (sinks, window, protected tokens,
    empty slots) always stay: where a sequence has fewer candidates than `n_evict`, only its candidates go,
    and its length counts what went."""
    idx = jax.lax.top_k(jnp.where(candidate, -scores, -jnp.inf), n_evict)[1]  # top_k takes the largest
    gone = trigger[..., None] & jnp.take_along_axis(candidate, idx, axis=-1)
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731  (one row per sequence, or per head)
    pos, idx_f, gone_f = flat(lc.pos), flat(idx), flat(gone)
    r = jnp.arange(pos.shape[0])[:, None]
    pos = pos.at[r, idx_f].set(jnp.where(gone_f, -1, pos[r, idx_f]))
    return pos.reshape(lc.pos.shape), lc.length - jnp.sum(gone, axis=-1, dtype=lc.length.dtype)
