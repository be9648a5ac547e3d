"""PyramidInfer's token selection against a slow, obvious NumPy reference written from SPEC §1.1-1.2.

The reference runs ONE sequence at a time, in float64, with no padding, no buckets, no ring buffers and no
slot bookkeeping: every layer holds a plain list of (position, k, v), every attention row is an array indexed
by *position*. It takes from pyrajax only the random weights/configs and the static per-layer *counts*
(`layer_lengths`, `gen_keep_counts`: the schedule is tested elsewhere); *which* tokens are kept is decided
here from the SPEC. The engine runs the same prompts as ONE ragged, padded batch, and must keep exactly the
same original positions in every layer, after prefill and after every generated token.

Every selection decision of the reference records its relative score margin (gap between the last kept and
the first dropped candidate); the tests require the margin to be far above float32 noise, so a disagreement
can only be a real difference of rule, never a near-tie decided differently by f32 and f64 arithmetic.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pyrajax
from pyrajax import cache as kvc
from pyrajax.cache import PyramidConfig
from pyrajax.generate import decode_step, prefill

MIN_MARGIN = 1e-4  # smallest relative score/logit gap accepted as well-posed (engine f32 vs f64 logits: ~1e-5)


@pytest.fixture(autouse=True, scope="module")
def _highest_precision():
    old = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    yield
    jax.config.update("jax_default_matmul_precision", old)


# ---------------------------------------------------------------------------------------------------------
# The NumPy float64 LLaMA, one sequence, no padding

FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def to_numpy(params) -> dict:
    f64 = lambda a: np.asarray(a, np.float64)
    return dict(embed=f64(params.embed), final_norm=f64(params.final_norm),
                lm_head=f64(params.embed).T if params.lm_head is None else f64(params.lm_head),
                layers=[{f: f64(getattr(lp, f)) for f in FIELDS} for lp in params.layers])


def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope(x, pos, theta):
    """x [n, heads, hd] at original positions pos [n]; rotate-half: feature i pairs with i + hd/2."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (np.arange(half) * 2.0 / x.shape[-1])
    ang = np.asarray(pos, np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def silu(x):
    return x / (1.0 + np.exp(-x))


def project(lp, cfg, x, pos):
    """q [n, H, hd], k and v [n, K, hd] (q and k rotated at their original positions)."""
    n, hd = x.shape[0], cfg.head_dim
    h = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
    q = (h @ lp["wq"]).reshape(n, cfg.num_heads, hd)
    k = (h @ lp["wk"]).reshape(n, cfg.num_kv_heads, hd)
    v = (h @ lp["wv"]).reshape(n, cfg.num_kv_heads, hd)
    return rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta), v


def attend(cfg, q, q_pos, k, v, k_pos):
    """GQA causal attention by original positions: out [nq, H, hd], probabilities [H, nq, nk]."""
    G = cfg.num_heads // cfg.num_kv_heads
    kk, vv = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # query head h reads kv head h // G
    s = np.einsum("qhd,khd->hqk", q, kk) / math.sqrt(cfg.head_dim)
    s = np.where(np.asarray(k_pos)[None, None, :] <= np.asarray(q_pos)[None, :, None], s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, vv), p


def finish(lp, cfg, x, out):
    x = x + out.reshape(out.shape[0], -1) @ lp["wo"]
    h = rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
    return x + (silu(h @ lp["w_gate"]) * (h @ lp["w_up"])) @ lp["w_down"]


def top2_gap(logits):
    a, b = np.sort(logits)[-2:][::-1]
    return (a - b) / max(abs(a), 1.0)


# ---------------------------------------------------------------------------------------------------------
# The PyramidInfer reference (SPEC §1.1-1.2), one sequence

class Reference:
    def __init__(self, P: dict, cfg, policy: PyramidConfig, prompt: list[int], max_new: int, protect=None):
        self.P, self.cfg, self.policy = P, cfg, policy
        self.tokens = list(prompt)
        self.s = s = len(prompt)
        L = cfg.num_layers
        self.W = min(s, 1 + math.floor(policy.recent_ratio * s))  # SPEC: W = 1 + floor(recent_ratio * S)
        # Counts only (static schedule, tested elsewhere): tokens entering each layer, generation budgets and
        # the reference rule's per-block keep counts.
        # Protected prompt positions (budget policies): never dropped in prefill or evicted in generation. No
        # mask: the policy's default, the last protect_tail prompt tokens.
        if protect is None:
            protect = np.arange(s) >= s - policy.protect_tail
        self.protected = set(np.flatnonzero(protect).tolist()) if policy.prefill_schedule == "budget" else set()
        outside = sum(1 for q in self.protected if q >= policy.num_sinks)
        self.n_keep, _, _, self.budget = kvc.layer_lengths(policy, s, max_new, L, outside)
        self.n_in = kvc.entering_lengths(policy, s, max_new, L, outside)  # tokens entering each layer
        self.gen_keep = kvc.gen_keep_counts(policy, L)
        self.span = s + max_new + 1  # length of the position-indexed attention rows
        self.kv = [None] * L  # per layer: dict(pos=[...], k=[...], v=[...]) in original order
        self.rows = [None] * L  # per layer: list of (query position, row over positions), oldest first
        self.acc = [None] * L  # per layer, H2O scorer: {position: attention summed over every query so far}
        self.next_block = s  # reference rule: first generated position not yet cut
        self.margins: list[float] = []  # relative score gap of every selection decision
        self.logit_gaps: list[float] = []
        self.gen_evictions = 0  # eviction events (any layer) during generation

    def _row(self, probs_heads, key_pos):
        """Head-averaged probabilities of one query, as an array indexed by key position (0 elsewhere)."""
        row = np.zeros(self.span)
        row[np.asarray(key_pos)] = probs_heads.mean(axis=0)
        return row

    def _weights(self):
        """Per window row (oldest first): linear over the last `observe` rows (all W by default), 0 before."""
        O = min(self.W, self.policy.observe or self.W)
        w = np.zeros(self.W)
        w[self.W - O:] = np.linspace(self.policy.recency_weight[0], self.policy.recency_weight[1], O)
        return w

    def _record_margin(self, kept_scores, dropped_scores):
        """Relative gap at the cut. Max-pooling (SnapKV) copies one value to its neighbours, so the cut may fall
        inside a group of exactly equal scores: ties go to the earlier position, here and in the engine, and
        the gap that must be clear of float noise is then the one to the nearest *different* score."""
        if len(kept_scores) and len(dropped_scores):
            a, b = min(kept_scores), max(dropped_scores)
            if a == b:
                others = [v for v in list(kept_scores) + list(dropped_scores) if v != a]
                b = min(others, key=lambda v: abs(v - a)) if others else 0.0
            self.margins.append(abs(a - b) / max(abs(a), 1e-300))

    def _combine(self, rows, at):
        """The window scorer over buffered rows (oldest first), read at positions `at`: the recency-weighted
        mean of the observed rows, or their maximum."""
        weights = self._weights()
        if self.policy.window_reduce == "max":
            return np.max([row[at] for w, (_, row) in zip(weights, rows) if w > 0], axis=0)
        score = sum(w * row[at] for w, (_, row) in zip(weights, rows))
        return score / min(self.W, self.policy.observe or self.W)

    @staticmethod
    def _value_norm(v):
        """Per token, ||v|| averaged over KV heads (v [n, K, hd])."""
        return np.linalg.norm(np.asarray(v), axis=-1).mean(axis=-1)

    def _prefill_scores(self, probs, pos, v):
        """The policy's score of each current token (index order) after a prefill layer."""
        pol = self.policy
        if pol.scorer == "recency":
            return pos.astype(np.float64)
        k = pol.pool_kernel // 2  # SnapKV: max over neighbouring tokens
        pool = lambda score: np.array([score[max(i - k, 0):i + k + 1].max() for i in range(len(pos))])
        if pol.scorer == "accumulated":  # H2O: head-mean attention summed over every query
            score = probs.mean(axis=0).sum(axis=0)
        else:
            score = self._combine(self.rows_now, pos)
        if pol.value_weighted:  # VATP: attention times the value's norm
            score = score * self._value_norm(v)
        return pool(score)

    def _select(self, score, pos, count):
        """Indices (into the current tokens) of sinks + window + the `count` best in all, in order."""
        pol, s, W = self.policy, self.s, self.W
        n = len(pos)
        forced = (pos < pol.num_sinks) | (pos >= s - W) | np.isin(pos, list(self.protected))
        context = [i for i in range(n) if not forced[i]]
        ranked = sorted(context, key=lambda i: -score[i])  # stable: ties go to the earlier token
        n_ctx = count - int(forced.sum())
        assert 0 <= n_ctx <= len(context)
        chosen, dropped = ranked[:n_ctx], ranked[n_ctx:]
        self._record_margin(score[chosen], score[dropped])
        return sorted([i for i in range(n) if forced[i]] + chosen)

    def _forward_layer(self, lp, x, pos):
        """One prefill layer on the tokens that reached it: (its output, k, v, attention probabilities)."""
        q, k, v = project(lp, self.cfg, x, pos)
        out, probs = attend(self.cfg, q, pos, k, v, pos)
        return finish(lp, self.cfg, x, out), k, v, probs

    def prefill(self) -> list[np.ndarray]:
        """Returns the positions each layer caches (with prune_hidden: the positions entering it)."""
        cfg, pol, P, s, W = self.cfg, self.policy, self.P, self.s, self.W
        x = P["embed"][np.asarray(self.tokens)]
        pos = np.arange(s)
        cached = []
        for l, lp in enumerate(P["layers"]):
            x, k, v, probs = self._forward_layer(lp, x, pos)
            # The window queries are the last W prompt tokens (always kept, so always the last W entries).
            n = len(pos)
            self.rows_now = [(int(pos[i]), self._row(probs[:, i, :], pos)) for i in range(n - W, n)]
            self.rows[l] = list(self.rows_now)
            selecting = pol.prefill_schedule != "none"
            score = self._prefill_scores(probs, pos, v) if selecting else None
            # Without hidden-state pruning, only this layer's cache is cut; with decoupled propagation the layer
            # also selects its cache among the tokens that reached it (PyramidInfer: it caches all of them).
            keep = (self._select(score, pos, self.n_keep[l]) if selecting and len(pos) > self.n_keep[l]
                    else list(range(n)))
            cached.append(pos[keep])
            self.kv[l] = dict(pos=list(pos[keep]), k=list(k[keep]), v=list(v[keep]))
            if pol.decode_scorer == "accumulated":
                self.acc[l] = {int(q): a for q, a in zip(pos, probs.mean(axis=0).sum(axis=0))}
            if pol.prune_hidden and selecting and l + 1 < cfg.num_layers:
                keep = self._select(score, pos, self.n_in[l + 1])
                x, pos = x[keep], pos[keep]
        logits = rms_norm(x[-1], P["final_norm"], cfg.norm_eps) @ P["lm_head"]
        self.logit_gaps.append(top2_gap(logits))
        return cached, logits

    def _buffer_scores(self, l, p):
        """Recency-weighted mean of layer l's buffered rows (queries p-W .. p-1), indexed by position."""
        rows = self.rows[l]
        assert [qp for qp, _ in rows] == list(range(p - self.W, p)), "the row buffer must hold the last W queries"
        return self._combine(rows, slice(None))

    def _drop(self, l, drop):
        kv = self.kv[l]
        keep = [i for i, q in enumerate(kv["pos"]) if q not in drop]
        self.kv[l] = {name: [kv[name][i] for i in keep] for name in kv}
        self.gen_evictions += 1

    def _gen_scores(self, l, p):
        """Layer l's generation-phase score of every position under the policy's decode scorer."""
        pol = self.policy
        if pol.decode_scorer == "window":
            score = self._buffer_scores(l, p)
        elif pol.decode_scorer == "accumulated":
            score = np.zeros(self.span)
            score[list(self.acc[l])] = list(self.acc[l].values())
        else:
            score = np.arange(self.span, dtype=np.float64)
        if pol.value_weighted:
            score[self.kv[l]["pos"]] *= self._value_norm(self.kv[l]["v"])
        return score

    def _evict(self, l, p, cut_block):
        pol, E = self.policy, self.policy.gen_block
        held = self.kv[l]["pos"]
        if pol.gen_rule == "reference" and cut_block:
            block = [q for q in held if self.next_block <= q < self.next_block + E]
            score = self._gen_scores(l, p)
            ranked = sorted(block, key=lambda q: -score[q])
            kept, dropped = ranked[:self.gen_keep[l]], ranked[self.gen_keep[l]:]
            if dropped:
                self._record_margin(score[kept], score[dropped])
                self._drop(l, set(dropped))
        elif pol.gen_rule == "budget" and len(held) >= self.budget[l]:
            # Neither sinks nor the W most recent positions (p-W+1 .. p, the new token included) may go.
            cand = [q for q in held if q >= pol.num_sinks and q <= p - self.W and q not in self.protected]
            score = self._gen_scores(l, p)
            ranked = sorted(cand, key=lambda q: score[q])
            dropped, kept = ranked[:E], ranked[E:]
            assert len(dropped) == E
            self._record_margin(score[kept], score[dropped])
            self._drop(l, set(dropped))

    def step(self, token: int):
        """Process one generated token at its true position; returns the logits."""
        cfg, P, E = self.cfg, self.P, self.policy.gen_block
        p = len(self.tokens)  # this token's position: prompt and generated tokens so far
        self.tokens.append(int(token))
        # Reference rule: the oldest uncut block of generated tokens, once all of it is <= newest - W.
        cut = self.policy.gen_rule == "reference" and self.next_block + E - 1 <= p - self.W
        x = P["embed"][[token]]
        for l, lp in enumerate(P["layers"]):
            self._evict(l, p, cut)
            q, k, v = project(lp, cfg, x, np.array([p]))
            kv = self.kv[l]
            kv["pos"].append(p), kv["k"].append(k[0]), kv["v"].append(v[0])
            out, probs = attend(cfg, q, [p], np.stack(kv["k"]), np.stack(kv["v"]), kv["pos"])
            self.rows[l] = (self.rows[l] + [(p, self._row(probs[:, 0, :], kv["pos"]))])[-self.W:]
            if self.acc[l] is not None:
                self.acc[l] = {q: self.acc[l].get(q, 0.0) + a for q, a in zip(kv["pos"], probs[:, 0, :].mean(axis=0))}
            x = finish(lp, cfg, x, out)
        if cut:
            self.next_block += E
        logits = rms_norm(x[0], P["final_norm"], cfg.norm_eps) @ P["lm_head"]
        self.logit_gaps.append(top2_gap(logits))
        return logits

    def held(self, l) -> np.ndarray:
        return np.asarray(self.kv[l]["pos"])


# ---------------------------------------------------------------------------------------------------------
# Engine driver

_prefill = jax.jit(prefill, static_argnames=("plan", "cfg"))
_decode = jax.jit(decode_step, static_argnames=("plan", "cfg", "impl"))


def engine_positions(cache) -> list[list[np.ndarray]]:
    """[layer][sequence] -> the positions held, ascending (generation reuses freed slots, so slot order is
    not position order; the count of valid slots must equal the layer's length)."""
    out = []
    for lc in cache.layers:
        pos, length = np.asarray(lc.pos), np.asarray(lc.length)
        assert (length <= pos.shape[1]).all(), f"a layer holds {length} tokens in {pos.shape[1]} slots"
        assert ((pos >= 0).sum(axis=1) == length).all(), "length disagrees with the valid slots"
        out.append([np.sort(pos[b][pos[b] >= 0]) for b in range(pos.shape[0])])
    return out


def describe(got, want):
    got_s, want_s = set(got.tolist()), set(want.tolist())
    return (f"engine {len(got)} tokens, reference {len(want)}; only in engine {sorted(got_s - want_s)}, "
            f"only in reference {sorted(want_s - got_s)}; engine in order: {list(got) == sorted(got)}")


def margin_note(ref: Reference) -> str:
    m = ref.margins
    return (f" (reference selection margins: smallest so far {min(m):.1e}, latest {m[-1]:.1e}; "
            f"below {MIN_MARGIN:.0e} would be a near-tie)") if m else ""


# ---------------------------------------------------------------------------------------------------------
# The comparisons

MODELS = {
    "h4kv2-L3": dict(num_layers=3, num_heads=4, num_kv_heads=2),
    "h6kv3-L5": dict(num_layers=5, num_heads=6, num_kv_heads=3, dim=96),
    "h4kv1-L4": dict(num_layers=4, num_heads=4, num_kv_heads=1, rope_theta=500.0),
}
POLICIES = {
    "reference": PyramidConfig(name="t", recent_ratio=0.1, gen_block=4, decay_ratio=0.5, min_context=4),
    "budget": PyramidConfig(name="b", prefill_schedule="budget", gen_rule="budget", budget=0.6, min_tokens=0,
                            protect_tail=0, gen_block=4, recent_ratio=0.1),
    # The same-budget baselines: no hidden-state pruning, each layer's cache cut by its own scores.
    **{family: PyramidConfig(name=family, prefill_schedule="budget", gen_rule="budget", budget=0.6, min_tokens=0,
                             protect_tail=0, gen_block=4, recent_ratio=0.1, **kvc.FAMILIES[family])
       for family in ("streaming", "h2o", "snapkv", "pyramidkv")},
    # Protected spans: the default tail, and explicit masks (below) with and without hidden-state pruning.
    "budget+tail": PyramidConfig(name="bt", prefill_schedule="budget", gen_rule="budget", budget=0.6, min_tokens=0,
                                 protect_tail=12, gen_block=4, recent_ratio=0.1),
    "budget+mask": PyramidConfig(name="bm", prefill_schedule="budget", gen_rule="budget", budget=0.6, min_tokens=0,
                                 gen_block=4, recent_ratio=0.1),
    "h2o+mask": PyramidConfig(name="hm", prefill_schedule="budget", gen_rule="budget", budget=0.6, min_tokens=0,
                              gen_block=4, recent_ratio=0.1, **kvc.FAMILIES["h2o"]),
}
# Decoupled propagation: late pruning (pyrajax's pyramid family) and a propagated set larger than the cache.
POLICIES["pyramid"] = PyramidConfig(name="py", prefill_schedule="budget", gen_rule="budget", budget=0.5,
                                    min_tokens=0, protect_tail=0, gen_block=4, recent_ratio=0.1,
                                    **kvc.FAMILIES["pyramid"])
POLICIES["propagate"] = PyramidConfig(name="pp", prefill_schedule="budget", gen_rule="budget", budget=0.5,
                                      min_tokens=0, protect_tail=0, gen_block=4, recent_ratio=0.1, propagate=1.5,
                                      pool_kernel=3)
# Scorer options: TOVA (the newest query alone) and a short observation window with hidden-state pruning.
POLICIES["tova"] = PyramidConfig(name="tv", prefill_schedule="budget", gen_rule="budget", budget=0.6, min_tokens=0,
                                 protect_tail=0, gen_block=4, recent_ratio=0.1, **kvc.FAMILIES["tova"])
POLICIES["observe"] = PyramidConfig(name="ob", prefill_schedule="budget", gen_rule="budget", budget=0.5,
                                    min_tokens=0, protect_tail=0, gen_block=4, recent_ratio=0.2, observe=3)
# Stronger scorers (the best-policy issue): max over the observed queries, value-aware scores, and window
# scores in prefill with accumulated attention for decode eviction, with and without hidden-state pruning.
POLICIES["max+value"] = PyramidConfig(name="mv", prefill_schedule="budget", gen_rule="budget", budget=0.5,
                                      min_tokens=0, protect_tail=0, gen_block=4, recent_ratio=0.2, observe=4,
                                      window_reduce="max", value_weighted=True)
POLICIES["window->acc"] = PyramidConfig(name="wa", prefill_schedule="budget", gen_rule="budget", budget=0.5,
                                        min_tokens=0, protect_tail=0, gen_block=4, recent_ratio=0.1,
                                        prune_from=0.3, pool_kernel=3, gen_scorer="accumulated")
POLICIES["snap->acc+value"] = PyramidConfig(name="sa", prefill_schedule="budget", gen_rule="budget", budget=0.6,
                                            min_tokens=0, protect_tail=0, gen_block=4, recent_ratio=0.1,
                                            **{**kvc.FAMILIES["snapkv"], "gen_scorer": "accumulated",
                                               "value_weighted": True, "window_reduce": "max"})
MASKED = ("budget+mask", "h2o+mask")  # explicit protect masks: ~15% of each prompt's positions at random
PROMPT_LENS = (37, 64, 90)
STEPS = 40
# Weight seeds (prompt seed = 100 + seed) whose reference decisions are all >= MIN_MARGIN from a tie: seed 1
# for h6kv3-L5 (a selection margin of 4e-5) and seed 2 for h4kv1-L4 (a greedy top-2 gap of 3e-6) were not.
SEEDS = {"h4kv2-L3": 0, "h6kv3-L5": 3, "h4kv1-L4": 1}
# Per policy where the model's seed gave a greedy top-2 gap or a selection margin below MIN_MARGIN (3.9e-5,
# 1.2e-5; 8.9e-5 for h4kv2-L3 with the pyramid family of 7754a49).
SEED_FOR_POLICY = {("h4kv1-L4", "h2o"): 4, ("h4kv2-L3", "snapkv"): 4, ("h6kv3-L5", "budget+mask"): 4,
                   ("h6kv3-L5", "pyramid"): 4, ("h4kv2-L3", "pyramid"): 4, ("h4kv2-L3", "tova"): 4,
                   ("h4kv1-L4", "window->acc"): 4, ("h6kv3-L5", "max+value"): 4}


def model_and_prompts(model_name: str, seed: int, lens):
    """The tiny model MODELS[model_name] with random weights of `seed`, and random prompts of `lens` tokens:
    (config, params, the rng that drew the prompts, prompts)."""
    cfg = dataclasses.replace(pyrajax.preset("tiny"), **MODELS[model_name])
    params = pyrajax.random_params(jax.random.key(seed), cfg, scale=0.2)
    rng = np.random.default_rng(100 + seed)
    return cfg, params, rng, [rng.integers(0, cfg.vocab_size, n).tolist() for n in lens]


# Every policy on the first model; on the others (more layers and heads, and one KV head) the policies whose
# mechanisms differ most: the reference schedule, budgets with a mask, late pruning, and the stronger scorer
# (each case compiles its own programs: the whole matrix would take a quarter of the suite).
WIDE = ("reference", "budget+mask", "pyramid", "snap->acc+value")
CASES = [(m, p) for m in sorted(MODELS) for p in sorted(POLICIES) if m == "h4kv2-L3" or p in WIDE]


@pytest.mark.parametrize("model_name,policy_name", CASES)
def test_engine_keeps_the_reference_tokens(model_name, policy_name):
    policy = POLICIES[policy_name]
    cfg, params, rng, prompts = model_and_prompts(model_name, SEED_FOR_POLICY.get((model_name, policy_name),
                                                                                 SEEDS[model_name]), PROMPT_LENS)
    P = to_numpy(params)
    masks = [rng.random(n) < 0.15 for n in PROMPT_LENS] if policy_name in MASKED else [None] * len(PROMPT_LENS)

    # Engine: one padded batch (prompt bucket 128, generation bucket 64, as `generate` would pick).
    L, B = cfg.num_layers, len(prompts)
    protected = [kvc.protected_outside(policy, s, m) for s, m in zip(PROMPT_LENS, masks)]
    plan = kvc.make_plan(policy, 128, 64, L, requests=tuple((s, STEPS, c) for s, c in zip(PROMPT_LENS, protected)))
    seq = kvc.make_seq_plan(plan, list(PROMPT_LENS), STEPS, masks)
    tokens = np.full((B, plan.prompt_bucket), cfg.pad_id, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    logits, cache = _prefill(params, jnp.asarray(tokens), seq, plan=plan, cfg=cfg)

    refs = [Reference(P, cfg, policy, p, STEPS, m) for p, m in zip(prompts, masks)]
    ref_out = [r.prefill() for r in refs]

    got = engine_positions(cache)
    for b, (entered, _) in enumerate(ref_out):
        for l in range(L):
            assert refs[b].protected <= set(got[l][b].tolist()), f"after prefill a protected token left layer {l}"
            assert np.array_equal(got[l][b], entered[l]), (
                f"after prefill, sequence {b} (S={PROMPT_LENS[b]}), layer {l}: " + describe(got[l][b], entered[l])
                + margin_note(refs[b]))
    if not policy.prune_hidden:  # the kept tokens' accumulated scores travel with them
        for lc in cache.layers:
            assert (lc.acc is not None) == (policy.decode_scorer == "accumulated")
    pruned = [l for l in range(L) for b in range(B) if len(ref_out[b][0][l]) < PROMPT_LENS[b]]
    assert pruned, "no layer was pruned in prefill: the comparison would be vacuous"

    # Greedy generation, token by token, comparing every layer after every step.
    logit_err = float(np.max(np.abs(np.asarray(logits, np.float64) - np.stack([lg for _, lg in ref_out]))))
    token = np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)
    ref_tok = np.array([int(np.argmax(lg)) for _, lg in ref_out])
    assert np.array_equal(token, ref_tok), f"first generated token: engine {token}, reference {ref_tok}"
    for t in range(STEPS):
        logits, cache = _decode(params, cache, jnp.asarray(token), plan=plan, cfg=cfg)
        ref_logits = [r.step(int(tok)) for r, tok in zip(refs, token)]
        logit_err = max(logit_err, float(np.max(np.abs(np.asarray(logits, np.float64) - np.stack(ref_logits)))))
        got = engine_positions(cache)
        for b, r in enumerate(refs):
            for l in range(L):
                assert r.protected <= set(got[l][b].tolist()), f"step {t}: a protected token left layer {l}"
                assert np.array_equal(got[l][b], r.held(l)), (
                    f"generation step {t} (token at position {PROMPT_LENS[b] + t}), sequence {b} "
                    f"(S={PROMPT_LENS[b]}), layer {l}: " + describe(got[l][b], r.held(l)) + margin_note(r))
        token = np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)
        ref_tok = np.array([int(np.argmax(lg)) for lg in ref_logits])
        assert np.array_equal(token, ref_tok), (f"step {t}: engine tokens {token}, reference {ref_tok} (reference "
                                                f"top-2 logit gaps {[f'{r.logit_gaps[-1]:.1e}' for r in refs]})")

    assert all(r.gen_evictions > 0 for r in refs), "no eviction during generation: the comparison would be vacuous"
    for b, r in enumerate(refs):
        assert any(len(r.held(l)) < PROMPT_LENS[b] + STEPS for l in range(L))
    # Well-posed: every decision the reference made was far from a tie, and so was every greedy token.
    margins = [m for r in refs for m in r.margins]
    gaps = [g for r in refs for g in r.logit_gaps]
    assert min(margins) > MIN_MARGIN, f"near-tie in a selection (relative margin {min(margins):.2e}); pick another seed"
    assert min(gaps) > MIN_MARGIN, f"near-tie between greedy tokens (gap {min(gaps):.2e}); pick another seed"
    assert logit_err < 1e-3, f"engine and reference logits differ by up to {logit_err:.2e}"


def test_reference_is_the_plain_model_without_pruning():
    """Sanity of the reference itself: with nothing dropped, its logits are the engine's full forward."""
    cfg = dataclasses.replace(pyrajax.preset("tiny"), **MODELS["h6kv3-L5"])
    params = pyrajax.random_params(jax.random.key(1), cfg, scale=0.2)
    prompt = np.random.default_rng(7).integers(0, cfg.vocab_size, 21).tolist()
    ref = Reference(to_numpy(params), cfg, PyramidConfig.full(), prompt, 2)
    _, lg0 = ref.prefill()
    lg1 = ref.step(5)
    want = np.asarray(pyrajax.logits(params, [prompt + [5]], cfg))[0]
    np.testing.assert_allclose(lg0, want[-2], rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(lg1, want[-1], rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------------------
# The static schedules at the paper's shapes

def spec_cosine_lengths(S, L, recent_ratio=0.2, r=0.9, min_context=64):
    """SPEC §1.1 written out: tokens entering each layer. Layer 0 keeps all; after layer l >= 1 keep
    floor(C * s_l) of the current context C, until that would be <= min(64, S - 1 - W), then stop for good."""
    W = 1 + math.floor(recent_ratio * S)
    C = S - W
    lengths = [S, S]  # layer 0 sees the prompt and keeps all of it
    stopped = False
    for l in range(1, L - 1):
        if not stopped:
            n = math.floor(C * ((1 - r) * (math.cos(math.pi * l / L) + 1) / 2 + r))
            if n <= min(min_context, S - 1 - W):
                stopped = True
            else:
                C = n
        lengths.append(C + W)
    return lengths


def test_paper_prefill_lengths_512():
    pre = kvc.layer_lengths(pyrajax.cache_preset("paper"), 512, 256, 32)[0]
    want = spec_cosine_lengths(512, 32)
    assert list(pre) == want
    assert list(pre[:4]) == [512, 512, 511, 510] and pre[5] == 507
    assert list(pre[-3:]) == [207, 196, 186]
    assert all(a >= b for a, b in zip(pre, pre[1:]))


@pytest.mark.parametrize("L", [32, 30])
def test_budget_045_plan(L):
    plan = kvc.make_plan(pyrajax.cache_preset("budget-0.45"), 512, 256, L)
    cap = plan.capacity
    assert sum(cap) / (L * 768) <= 0.454, sum(cap) / (L * 768)
    assert all(a >= b for a, b in zip(cap, cap[1:])), cap
    pre = kvc.layer_lengths(pyrajax.cache_preset("budget-0.45"), 512, 256, L)[0]
    assert cap[0] >= 512 and all(p <= c for p, c in zip(pre, cap))
