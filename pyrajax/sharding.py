"""Tensor parallelism through jax.sharding: a Mesh with a "tp" axis, shardings as part of the pytree layout.

The layout (Megatron / jax-llm-examples): activations replicated; wqkv and w_gate_up column-parallel (split
over KV heads and over F), wo and w_down row-parallel, so each attention block and each MLP block ends in one
all-reduce; the embedding and the LM head split over the vocabulary; every layer's K and V split over KV heads.
Everything else, the per-sequence schedules, positions, lengths, the window rows and accumulated scores that the
pyramid selects by, is replicated: each device makes the same selection from the same numbers.

With fewer KV heads than devices (LLaMA-2-70B at TP = 16, the tiny test models at TP = 4 and 8), each KV head
is copied `kv_copies` = devices / K times in the fused weights (`pyrajax.params`) and its query heads are spread
over the copies: device d holds a copy of KV head d // kv_copies and its share of that head's queries, so the
cache, split over the copied heads, is each KV head replicated over kv_copies devices, as the layout asks. A
model whose heads do not divide (SmolLM2: 9 heads, 3 KV heads) keeps attention replicated and splits only the
MLP and the vocabulary.

XLA's SPMD partitioner (GSPMD) places the collectives of the jnp code from the weights' shardings and the
constraints below. The kernels (Pallas custom calls, and their XLA references alike) run per device inside
`shard_map` on the device's own heads, with one psum where they average over heads: the window rows, the
accumulated scores and the decode-attention probability row (the pyramid's one reduction per layer). Without a
mesh (`mesh=None`: one device) every function here is the plain single-device call, so TP = 1 is unchanged.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels as kernels
from pyrajax.config import ModelConfig
from pyrajax.params import LayerParams, Params, fuse_layer, random_checkpoint_tree, to_tree

TP, DP = "tp", "dp"


def _shard_map(f, mesh: Mesh, in_specs, out_specs):
    """`jax.shard_map` (jax 0.10 and 0.11 both have it) with check_vma=False, which Pallas calls need."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # older jax
    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


# ---------------------------------------------------------------------------------------------------------
# The mesh

def make_mesh(tp: int = 1, dp: int = 1, devices=None) -> Mesh:
    """A (dp, tp) mesh over the first dp*tp devices (or `devices`). Data parallelism is not implemented (run one
    engine per replica): dp must be 1."""
    for name, n in (("tp", tp), ("dp", dp)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    if dp != 1:
        raise ValueError(f"dp={dp}: data parallelism is not implemented; run one engine per replica (dp=1)")
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < tp * dp:
        raise ValueError(f"a mesh of tp={tp} x dp={dp} needs {tp * dp} devices, there are {len(devices)} (on CPU: "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={tp * dp} before jax starts)")
    grid = np.array(devices[:tp * dp], dtype=object).reshape(dp, tp)
    kinds = getattr(jax.sharding, "AxisType", None)
    if kinds is not None:  # "auto" axes: GSPMD places the collectives (newer jax may default to explicit ones)
        return Mesh(grid, (DP, TP), axis_types=(kinds.Auto, kinds.Auto))
    return Mesh(grid, (DP, TP))


def tp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape[TP])


def mesh_of(tree) -> Mesh | None:
    """The mesh that a pytree (the params) is split over, or None on one device (then every path is today's)."""
    for leaf in jax.tree.leaves(tree):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.shape.get(TP, 1) > 1:
            return s.mesh
    return None


def _split(n: int, mesh: Mesh | None):
    """The axis a dimension of size n is split over, or None (replicated) where it does not divide."""
    t = tp_size(mesh)
    return TP if t > 1 and n % t == 0 else None


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a model spreads over `tp` devices."""
    tp: int
    kv_copies: int  # copies of each KV head in the fused weights and the cache
    heads: bool  # attention (wqkv, wo, K and V) split over heads; False: replicated
    mlp: bool  # w_gate_up and w_down split over F
    vocab: bool  # embedding and LM head split over the vocabulary


def layout(cfg: ModelConfig, tp: int) -> Layout:
    K, H = cfg.num_kv_heads, cfg.num_heads
    if tp == 1:
        return Layout(1, 1, False, False, False)
    if K % tp == 0:
        copies, heads = 1, True
    elif tp % K == 0 and H % tp == 0:  # fewer KV heads than devices: copy them, spread their query heads
        copies, heads = tp // K, True
    else:
        copies, heads = 1, False
    return Layout(tp, copies, heads, cfg.ffn_dim % tp == 0, cfg.vocab_size % tp == 0)


# ---------------------------------------------------------------------------------------------------------
# Shardings of the weights: the fused Params, and the checkpoint tree they are built from

def _axis(on: bool):
    return TP if on else None


def layer_specs(lay: Layout) -> LayerParams:
    h, f = _axis(lay.heads), _axis(lay.mlp)
    return LayerParams(attn_norm=P(), wqkv=P(None, h), wo=P(h, None), mlp_norm=P(), w_gate_up=P(None, None, f),
                       w_down=P(f, None), kv_copies=lay.kv_copies)


def param_specs(cfg: ModelConfig, lay: Layout) -> Params:
    """PartitionSpecs of the fused Params (a Params of specs)."""
    v = _axis(lay.vocab)
    return Params(embed=P(v, None), final_norm=P(), lm_head=None if cfg.tie_embeddings else P(None, v),
                  layers=(layer_specs(lay),) * cfg.num_layers)


def checkpoint_specs(cfg: ModelConfig, lay: Layout) -> dict:
    """PartitionSpecs of the checkpoint tree (the unfused weights), chosen so that fusing them needs no
    communication: wq's columns split into whole query-head groups, wk / wv by KV head (or replicated, being
    small, where they get copied), gate / up by F."""
    h, f, v = _axis(lay.heads), _axis(lay.mlp), _axis(lay.vocab)
    kv = h if lay.kv_copies == 1 else None
    layer = dict(attn_norm=P(), wq=P(None, h), wk=P(None, kv), wv=P(None, kv), wo=P(h, None), mlp_norm=P(),
                 w_gate=P(None, f), w_up=P(None, f), w_down=P(f, None))
    tree = {"embed": P(v, None), "final_norm": P(), "layers": {str(i): dict(layer) for i in range(cfg.num_layers)}}
    if not cfg.tie_embeddings:
        tree["lm_head"] = P(None, v)
    return tree


def named(mesh: Mesh, specs):
    """NamedShardings of a pytree of PartitionSpecs."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


@functools.lru_cache(maxsize=16)
def _fuse_program(cfg: ModelConfig, mesh: Mesh):
    lay = layout(cfg, tp_size(mesh))
    return jax.jit(lambda w: fuse_layer(w, cfg, lay.kv_copies), out_shardings=named(mesh, layer_specs(lay)))


def fuse_sharded(tree: dict, cfg: ModelConfig, mesh: Mesh, free: bool = True) -> Params:
    """Params from a checkpoint tree that lies in `checkpoint_specs`' shardings: each layer fused where its
    shards are (one small program, outputs in the Params' shardings). With `free`, a layer's unfused arrays are
    deleted once fused, so the peak is the sharded model plus one layer."""
    fuse = _fuse_program(cfg, mesh)
    layers = []
    for i in range(cfg.num_layers):
        weights = tree["layers"][str(i)]
        layers.append(fuse(weights))
        if free:
            for w in weights.values():
                w.delete()
    return Params(embed=tree["embed"], layers=tuple(layers), final_norm=tree["final_norm"],
                  lm_head=tree.get("lm_head"))


def shard(params: Params, config: ModelConfig, mesh: Mesh | None) -> Params:
    """The params laid out over `mesh` (`layout`: KV heads copied where there are fewer than devices). A mesh of
    one device (or None) gives the single-device params back, unfused views re-fused without copies."""
    tree = to_tree(params)  # the unfused weights (views of the fused ones; a layer's copies dropped)
    if tp_size(mesh) == 1:
        from pyrajax.params import from_tree
        return from_tree(tree, config)
    tree = jax.device_put(tree, named(mesh, checkpoint_specs(config, layout(config, tp_size(mesh)))))
    return fuse_sharded(tree, config, mesh, free=False)


def random_params(key: jax.Array, cfg: ModelConfig, mesh: Mesh | None, dtype=jnp.float32,
                  scale: float = 0.02) -> Params:
    """`pyrajax.random_params`' weights (the same values for a key), each created on its devices in its
    shardings: no device ever holds the whole model (benchmarks of models larger than one device)."""
    if tp_size(mesh) == 1:
        from pyrajax.params import random_params as plain
        return plain(key, cfg, dtype, scale)
    specs = named(mesh, checkpoint_specs(cfg, layout(cfg, tp_size(mesh))))
    return fuse_sharded(random_checkpoint_tree(key, cfg, dtype, scale, specs), cfg, mesh)


# ---------------------------------------------------------------------------------------------------------
# Activations and the cache

def constrain(x, spec: P, mesh: Mesh | None):
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicated(x, mesh: Mesh | None):
    """x on every device whole (the activations between blocks; logits before sampling)."""
    return constrain(x, P(), mesh)


def by_heads(x, axis: int, mesh: Mesh | None):
    """x split over its head axis (where the heads divide over the devices)."""
    if mesh is None:
        return x
    spec = [None] * x.ndim
    spec[axis] = _split(x.shape[axis], mesh)
    return constrain(x, P(*spec), mesh)


def state_specs(tree, mesh: Mesh | None):
    """PartitionSpecs of a cache or decode-state pytree: each LayerCache's K and V [B, K, C, hd] split over heads,
    every other array (positions, lengths, rows, scores, schedules, settings) replicated."""
    def spec(path, x):
        name = getattr(path[-1], "name", None) if path else None
        if name in ("k", "v") and x.ndim == 4:
            return P(None, _split(x.shape[1], mesh))
        return P()
    return jax.tree_util.tree_map_with_path(spec, tree)


def constrain_state(tree, mesh: Mesh | None):
    """Pin a cache / decode state to `state_specs` inside a program (so outputs, loop carries and donated
    buffers keep one layout from call to call)."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x, s: constrain(x, s, mesh), tree, state_specs(tree, mesh))


def create_state(make, mesh: Mesh | None):
    """The cache / decode state that `make()` builds, created on the mesh in `state_specs`' layout (each device
    filling only its shards: a cache larger than one device never exists whole)."""
    if mesh is None:
        return make()
    return jax.jit(make, out_shardings=named(mesh, state_specs(jax.eval_shape(make), mesh)))()


# ---------------------------------------------------------------------------------------------------------
# The kernels, per device on its own heads

def _head_mean(x, local_heads: int, heads: int):
    """The mean over all heads from each device's mean over its own: one psum."""
    return jax.lax.psum(x * (local_heads / heads), TP)


def decode_attention(q, k, v, k_pos, q_pos, length, *, impl: str, mesh: Mesh | None):
    """`pallas_kernels.decode_attention` with q [B, H, hd] and k/v [B, K, C, hd] split over heads; the
    head-averaged probability row [B, C] is summed over devices, identical on each."""
    if mesh is None:
        return kernels.decode_attention(q, k, v, k_pos, q_pos, length, impl=impl)
    h, H = _split(k.shape[1], mesh), q.shape[1]
    per_head = k_pos.ndim == 3  # per-KV-head positions and probability rows go with their heads
    pos_spec = P(None, h) if per_head else P()

    def local(q, k, v, k_pos, q_pos, length):
        out, prob = kernels.decode_attention(q, k, v, k_pos, q_pos, length, impl=impl)
        return out, (_head_mean(prob, q.shape[1], H) if h and not per_head else prob)

    return _shard_map(local, mesh, (P(None, h), P(None, h), P(None, h), pos_spec, P(), P()),
                      (P(None, h), pos_spec))(q, k, v, k_pos, q_pos, length)


def window_rows(q_win, k, q_pos, k_pos, *, impl: str, mesh: Mesh | None, per_head: bool = False):
    """`pallas_kernels.window_rows` (q_win [B, W, H, hd], k [B, n, K, hd]) per device, rows summed over devices
    (per KV head [B, K, W, n]: one device only so far, which `prefill` checks)."""
    if mesh is None or per_head:
        return kernels.window_rows(q_win, k, q_pos, k_pos, impl=impl, per_head=per_head)
    h, H = _split(k.shape[2], mesh), q_win.shape[2]

    def local(q_win, k, q_pos, k_pos):
        rows = kernels.window_rows(q_win, k, q_pos, k_pos, impl=impl)
        return _head_mean(rows, q_win.shape[2], H) if h else rows

    return _shard_map(local, mesh, (P(None, None, h), P(None, None, h), P(), P()), P())(q_win, k, q_pos, k_pos)


def score_reduction(q, k, q_pos, k_pos, row_weight, *, impl: str, mesh: Mesh | None):
    """`pallas_kernels.score_reduction` (q [B, H, T, hd], k [B, K, n, hd]) per device, summed over devices."""
    if mesh is None:
        return kernels.score_reduction(q, k, q_pos, k_pos, row_weight, impl=impl)
    h, H = _split(k.shape[1], mesh), q.shape[1]

    def local(q, k, q_pos, k_pos, row_weight):
        scores = kernels.score_reduction(q, k, q_pos, k_pos, row_weight, impl=impl)
        return _head_mean(scores, q.shape[1], H) if h else scores

    return _shard_map(local, mesh, (P(None, h), P(None, h), P(), P(), P()), P())(q, k, q_pos, k_pos, row_weight)


def gather_hidden(idx, x, pos, *, impl: str, mesh: Mesh | None):
    """The kept tokens' hidden states [B, m, D] (`pallas_kernels.pivotal_gather`): replicated in, replicated out,
    each device gathering its own copy by the same indices."""
    if mesh is None:
        return kernels.pivotal_gather(idx, x, pos, impl=impl)[0]
    local = lambda idx, x, pos: kernels.pivotal_gather(idx, x, pos, impl=impl)[0]  # noqa: E731
    return _shard_map(local, mesh, (P(), P(), P()), P())(idx, x, pos)


def gather_kv(idx, k, v, pos, *, impl: str, mesh: Mesh | None):
    """The kept tokens' keys and values (k, v [B, n, K, hd] -> [B, m, K, hd]) in one gather of both: on each
    device its own heads (concatenated locally, so no head leaves its device)."""
    def both(idx, k, v, pos):
        B, n, K, hd = k.shape
        kv = kernels.pivotal_gather(idx, jnp.concatenate([k, v], axis=2).reshape(B, n, -1), pos, impl=impl)[0]
        return tuple(jnp.split(kv.reshape(B, -1, 2 * K, hd), 2, axis=2))
    if mesh is None:
        return both(idx, k, v, pos)
    h = _split(k.shape[2], mesh)
    return _shard_map(both, mesh, (P(), P(None, None, h), P(None, None, h), P()),
                      (P(None, None, h), P(None, None, h)))(idx, k, v, pos)


# ---------------------------------------------------------------------------------------------------------
# Memory

def _shard_bytes(x) -> int:
    """Bytes of the largest shard of one array (an Array, or a ShapeDtypeStruct with a sharding)."""
    s = getattr(x, "sharding", None)
    shape = s.shard_shape(x.shape) if s is not None else x.shape
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def bytes_per_device(tree) -> int:
    """Bytes a device holds of a pytree (its largest share: shards of one array have one shape)."""
    return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))
