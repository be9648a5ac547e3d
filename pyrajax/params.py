"""Weights as a registered pytree, and their orbax checkpoint format.

Matrices are stored [in, out] so that `x @ w` is the forward map. Q/K projection columns use the HF
("rotate-half") rotary layout: within each head, the first half of the features pairs with the second half.

In memory a layer's projections are fused (one matmul for q, k and v, one for gate and up: fewer, larger
GEMMs per decode step); the checkpoint keeps the unfused weights (`LAYER_FIELDS`), fused when loading and
unfused when saving. The fused layouts are chosen so that tensor parallelism splits them without moving columns:
  wqkv [D, K, G + 2, hd]: per KV head, its G query heads, then its key head, then its value head, so a split
      of the KV-head axis keeps every group whole on one device;
  w_gate_up [D, 2, F]: gate and up side by side, so a split of F keeps each device's gate and up columns paired.
With fewer KV heads than devices, each KV head is copied (`kv_copies`) and its query heads spread over the
copies (`pyrajax.sharding`): K*kv_copies virtual KV heads of G/kv_copies query heads each, the same maths.
"""
from __future__ import annotations

import ctypes
import errno
import math
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pyrajax.config import ModelConfig

# The checkpoint's per-layer weights (and the converters'): the unfused projections.
LAYER_FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [D]
    wqkv: jax.Array  # [D, K*c, G/c + 2, hd]: per (virtual) KV head its query heads, key, value; c = kv_copies
    wo: jax.Array  # [H*hd, D]
    mlp_norm: jax.Array  # [D]
    w_gate_up: jax.Array  # [D, 2, F]
    w_down: jax.Array  # [F, D]
    # Copies of each KV head (1 unless tensor parallelism spreads K < devices KV heads): static, so the
    # checkpoint views below can drop the copies again.
    kv_copies: int = struct.field(pytree_node=False, default=1)

    # The checkpoint's unfused weights, as views of the fused ones (saving, checks, references).
    @property
    def wq(self) -> jax.Array:  # [D, H*hd]; head h = k*G + g is column block h, as in the checkpoint
        return self.wqkv[:, :, :-2].reshape(self.wqkv.shape[0], -1)

    @property
    def wk(self) -> jax.Array:  # [D, K*hd]
        return self.wqkv[:, ::self.kv_copies, -2].reshape(self.wqkv.shape[0], -1)

    @property
    def wv(self) -> jax.Array:  # [D, K*hd]
        return self.wqkv[:, ::self.kv_copies, -1].reshape(self.wqkv.shape[0], -1)

    @property
    def w_gate(self) -> jax.Array:  # [D, F]
        return self.w_gate_up[:, 0]

    @property
    def w_up(self) -> jax.Array:  # [D, F]
        return self.w_gate_up[:, 1]


def fuse_layer(weights, cfg: ModelConfig, kv_copies: int = 1) -> LayerParams:
    """A layer from its checkpoint weights (a mapping of `LAYER_FIELDS`): NumPy inputs stay NumPy (converters,
    host-side loading), jax arrays stay on their devices."""
    xp = np if all(isinstance(weights[f], np.ndarray) for f in ("wq", "wk", "wv", "w_gate", "w_up")) else jnp
    D, K, hd, c = cfg.dim, cfg.num_kv_heads, cfg.head_dim, kv_copies
    q = weights["wq"].reshape(D, K * c, cfg.q_per_kv // c, hd)
    kv = [xp.repeat(weights[f].reshape(D, K, 1, hd), c, axis=1) for f in ("wk", "wv")]
    return LayerParams(attn_norm=weights["attn_norm"], wqkv=xp.concatenate([q, *kv], axis=2), wo=weights["wo"],
                       mlp_norm=weights["mlp_norm"], w_gate_up=xp.stack([weights["w_gate"], weights["w_up"]], axis=1),
                       w_down=weights["w_down"], kv_copies=c)


@struct.dataclass
class Params:
    embed: jax.Array  # [V, D]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V]; None when tied to `embed`


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every checkpoint weight of one layer and of the globals, keyed by field name."""
    D, F, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    return {
        "embed": (cfg.vocab_size, D), "final_norm": (D,), "lm_head": (D, cfg.vocab_size),
        "attn_norm": (D,), "wq": (D, cfg.num_heads * hd), "wk": (D, cfg.num_kv_heads * hd),
        "wv": (D, cfg.num_kv_heads * hd), "wo": (cfg.num_heads * hd, D), "mlp_norm": (D,),
        "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D),
    }


def checkpoint_bytes(cfg: ModelConfig, itemsize: int) -> int:
    """Bytes of the model's weights (the checkpoint's; copies made for tensor parallelism not counted)."""
    shapes = expected_shapes(cfg)
    names = ["embed", "final_norm"] + ([] if cfg.tie_embeddings else ["lm_head"])
    count = sum(math.prod(shapes[n]) for n in names) + cfg.num_layers * sum(math.prod(shapes[f]) for f in LAYER_FIELDS)
    return count * itemsize


def fused_shapes(cfg: ModelConfig, kv_copies: int = 1) -> dict[str, tuple[int, ...]]:
    """Shape of every in-memory weight of one layer (`LayerParams` fields)."""
    shapes = expected_shapes(cfg)
    c = kv_copies
    return {"attn_norm": shapes["attn_norm"], "wo": shapes["wo"], "mlp_norm": shapes["mlp_norm"],
            "w_down": shapes["w_down"], "w_gate_up": (cfg.dim, 2, cfg.ffn_dim),
            "wqkv": (cfg.dim, cfg.num_kv_heads * c, cfg.q_per_kv // c + 2, cfg.head_dim)}


def named_weights(params: Params) -> list[tuple[str, jax.Array]]:
    """Every weight with its checkpoint name ("embed", "layers.3.wq", ...), unfused as the checkpoint holds it."""
    named = [("embed", params.embed), ("final_norm", params.final_norm)]
    if params.lm_head is not None:
        named.append(("lm_head", params.lm_head))
    for i, layer in enumerate(params.layers):
        named += [(f"layers.{i}.{f}", getattr(layer, f)) for f in LAYER_FIELDS]
    return named


def _check_globals(n_layers: int, has_lm_head: bool, cfg: ModelConfig) -> None:
    if n_layers != cfg.num_layers:
        raise ValueError(f"params have {n_layers} layers but the config says {cfg.num_layers}; "
                         "load the params and config from the same checkpoint")
    if (not has_lm_head) != cfg.tie_embeddings:
        raise ValueError(f"config.tie_embeddings={cfg.tie_embeddings} but params "
                         f"{'have' if has_lm_head else 'lack'} an lm_head")


def _check_shapes(named, shapes: dict) -> None:
    for name, arr in named:
        want = shapes[name.rpartition(".")[2]]
        if tuple(arr.shape) != want:
            raise ValueError(f"weight {name} has shape {tuple(arr.shape)} but the config needs {want}; "
                             "the params do not belong to this config")


def check_params(params: Params, cfg: ModelConfig) -> None:
    """Raise ValueError naming the first weight whose shape does not match `cfg`."""
    _check_globals(len(params.layers), params.lm_head is not None, cfg)
    shapes = expected_shapes(cfg)
    named = [("embed", params.embed), ("final_norm", params.final_norm)]
    if params.lm_head is not None:
        named.append(("lm_head", params.lm_head))
    _check_shapes(named, shapes)
    for i, layer in enumerate(params.layers):
        c = layer.kv_copies
        if not (isinstance(c, int) and c >= 1 and cfg.q_per_kv % c == 0):
            raise ValueError(f"layer {i} has kv_copies={c!r}; it must divide the {cfg.q_per_kv} query heads per "
                             "KV head")
        _check_shapes([(f"layers.{i}.{f}", getattr(layer, f)) for f in fused_shapes(cfg, c)], fused_shapes(cfg, c))


def nonfinite(w) -> str | None:
    """None when every value of `w` is finite, else how many are NaN and how many infinite (a phrase)."""
    w = np.asarray(w)
    if w.dtype.kind in "iub":
        return None
    finite = np.isfinite(w)  # works on numpy floats and ml_dtypes (bfloat16)
    if finite.all():
        return None
    nan = int(np.isnan(w).sum())
    return f"{nan} NaN and {w.size - int(finite.sum()) - nan} infinite values"


def cast(params: Params, dtype) -> Params:
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def random_checkpoint_tree(key: jax.Array, cfg: ModelConfig, dtype=jnp.float32, scale: float = 0.02,
                           shardings: dict | None = None) -> dict:
    """Random checkpoint weights (the unfused tree `to_tree` gives), drawn in a fixed order from `key`; with
    `shardings` (a tree of them, as the checkpoint's), each weight is created in its sharding on its devices."""
    shapes = expected_shapes(cfg)
    keys = iter(jax.random.split(key, 3 + 9 * cfg.num_layers))

    def init(*path):
        name, k = path[-1], next(keys)
        sharding = None
        if shardings is not None:
            sharding = shardings
            for p in path:
                sharding = sharding[p]
        return _random_weight(k, shapes[name], jnp.dtype(dtype), name.endswith("norm"), scale, sharding)

    tree = {"layers": {str(i): {f: init("layers", str(i), f) for f in LAYER_FIELDS} for i in range(cfg.num_layers)}}
    if not cfg.tie_embeddings:
        tree["lm_head"] = init("lm_head")
    tree["embed"] = init("embed")
    tree["final_norm"] = init("final_norm")
    return tree


def _random_weight(key, shape, dtype, norm: bool, scale: float, sharding=None):
    def draw(key):
        if norm:
            return (1.0 + 0.1 * jax.random.normal(key, shape)).astype(dtype)
        return (scale * jax.random.normal(key, shape)).astype(dtype)
    # One array at a time (one jitted program for all weights compiles for minutes); sharded: created in place.
    return draw(key) if sharding is None else jax.jit(draw, out_shardings=sharding)(key)


def random_params(key: jax.Array, cfg: ModelConfig, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random weights of the exact shapes of `cfg` (tests and benchmarks; created on the default device;
    `pyrajax.sharding.random_params` creates them split over a mesh)."""
    tree = random_checkpoint_tree(key, cfg, dtype, scale)
    layers = tuple(fuse_layer(tree["layers"][str(i)], cfg) for i in range(cfg.num_layers))
    return Params(embed=tree["embed"], layers=layers, final_norm=tree["final_norm"], lm_head=tree.get("lm_head"))


# ---------------------------------------------------------------------------------------------------------
# Checkpoint directory:  config.json, params/ (orbax), tokenizer/ (optional, HF tokenizer files)

def to_tree(params: Params) -> dict:
    tree = {"embed": params.embed, "final_norm": params.final_norm,
            "layers": {str(i): {f: getattr(l, f) for f in LAYER_FIELDS} for i, l in enumerate(params.layers)}}
    if params.lm_head is not None:
        tree["lm_head"] = params.lm_head
    return tree


def _tree_get(tree: dict, *keys):
    node = tree
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise ValueError(f"checkpoint is missing weight {'.'.join(keys)}; re-convert it with pyrajax-convert")
        node = node[k]
    return node


def check_tree(tree: dict, cfg: ModelConfig) -> list[tuple[str, object]]:
    """The checkpoint tree's weights by checkpoint name, after checking that each is present with the shape
    `cfg` needs (ValueError naming the first that is not). Works on arrays and on orbax metadata alike."""
    named = [("embed", _tree_get(tree, "embed")), ("final_norm", _tree_get(tree, "final_norm"))]
    lm_head = tree.get("lm_head") if cfg.tie_embeddings else _tree_get(tree, "lm_head")
    if lm_head is not None:
        named.append(("lm_head", lm_head))
    for i in range(cfg.num_layers):
        named += [(f"layers.{i}.{f}", _tree_get(tree, "layers", str(i), f)) for f in LAYER_FIELDS]
    _check_globals(cfg.num_layers, lm_head is not None, cfg)
    _check_shapes(named, expected_shapes(cfg))
    return named


def from_tree(tree: dict, cfg: ModelConfig, kv_copies: int = 1) -> Params:
    """Params from a checkpoint tree: shapes checked under their checkpoint names, then fused."""
    check_tree(tree, cfg)
    layers = tuple(fuse_layer(tree["layers"][str(i)], cfg, kv_copies) for i in range(cfg.num_layers))
    return Params(embed=tree["embed"], layers=layers, final_norm=tree["final_norm"], lm_head=tree.get("lm_head"))


def _mkdir_unique(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory in `parent` with the mode a plain mkdir gives (0o777 & ~umask).

    Unlike tempfile.mkdtemp (always 0700), so that a shared checkpoint stays readable to others once renamed in.
    """
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path)  # the kernel applies the umask; no racy os.umask() read needed
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique {prefix}* directory in {parent}")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False if unsupported here."""
    if sys.platform != "linux":
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if fn is None:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):  # old kernel, fs or seccomp says no
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _replace_dir(new: Path, dst: Path) -> None:
    """Put directory `new` at the existing `dst`, deleting the old one; `dst` always holds old or new."""
    if _exchange(new, dst):
        shutil.rmtree(new)  # `new` now names the old checkpoint
        return
    # Fallback: two renames, with a window where dst is missing; on failure put the old one back.
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / "ckpt")
    try:
        os.rename(new, dst)
    except BaseException:
        try:
            os.rename(old / "ckpt", dst)
        except OSError as e:
            raise OSError(f"overwriting {dst} failed and the old checkpoint could not be moved back; "
                          f"it is at {old / 'ckpt'}") from e
        os.rmdir(old)
        raise
    shutil.rmtree(old)


def save_checkpoint(params: Params, cfg: ModelConfig, dst: str | Path, *, tokenizer_dir: str | Path | None = None,
                    force: bool = False) -> Path:
    """Write a checkpoint atomically: everything goes to a temporary sibling directory, swapped in at the end.

    Overwriting (force=True) keeps either the old or the new complete checkpoint at `dst`, never neither: on
    Linux the swap is one atomic renameat2(RENAME_EXCHANGE); elsewhere a failed second rename is rolled back.
    """
    import orbax.checkpoint as ocp

    dst = Path(dst).absolute()
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to overwrite it")
    check_params(params, cfg)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # A fresh unique name: a leftover from an interrupted earlier run cannot block the swap.
    tmp = _mkdir_unique(dst.parent, f".{dst.name}.tmp-")
    try:
        (tmp / "config.json").write_text(cfg.to_json())
        tree = jax.tree.map(np.asarray, to_tree(params))
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", tree)
        ckptr.wait_until_finished()
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        if dst.exists():
            if not dst.is_dir():
                raise FileExistsError(f"{dst} is a file, not a checkpoint directory; remove it or pick another path")
            _replace_dir(tmp, dst)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _metadata_tree(ckptr, path: Path) -> dict:
    """The saved arrays' metadata (shape, dtype) in the tree's structure (orbax versions differ in wrapping)."""
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    return getattr(meta, "tree", meta)


def _sharded_target(meta: dict, cfg: ModelConfig, mesh) -> dict:
    """The restore target: every saved array as a ShapeDtypeStruct in its shard layout (`pyrajax.sharding`),
    in its saved dtype (`load_checkpoint` casts on device afterwards)."""
    from jax.sharding import NamedSharding, PartitionSpec
    from pyrajax import sharding as sh
    specs = sh.checkpoint_specs(cfg, sh.layout(cfg, sh.tp_size(mesh)))

    def target(keys, m):
        spec = specs
        for k in keys:  # anything the layout does not name (nothing, in a checkpoint of ours) is replicated
            spec = spec.get(getattr(k, "key", k), PartitionSpec()) if isinstance(spec, dict) else PartitionSpec()
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
        return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=NamedSharding(mesh, spec))
    return jax.tree_util.tree_map_with_path(target, meta)


def _nonfinite_on_device(w) -> str | None:
    """`nonfinite` of an array where it lies (two scalars come back, not the array)."""
    if not jnp.issubdtype(w.dtype, jnp.floating):
        return None
    bad, nan = (int(x) for x in jax.jit(lambda a: (jnp.sum(~jnp.isfinite(a)), jnp.sum(jnp.isnan(a))))(w))
    return None if bad == 0 else f"{nan} NaN and {bad - nan} infinite values"


def load_checkpoint(path: str | Path, dtype=jnp.bfloat16, mesh=None) -> tuple[Params, ModelConfig]:
    """(params, config) of a checkpoint directory; with a `mesh` (pyrajax.make_mesh) the weights are restored
    straight into their shards (`pyrajax.sharding`), fused there, never whole on one host or device."""
    import orbax.checkpoint as ocp

    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a checkpoint directory, got {path!r} ({type(path).__name__})")
    path = Path(path).absolute()
    if not (path / "config.json").is_file() or not (path / "params").is_dir():
        raise FileNotFoundError(f"{path} is not a pyrajax checkpoint (needs config.json and params/); "
                                "create one with `pyrajax-convert SRC DST`")
    try:
        cfg = ModelConfig.load(path / "config.json")
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path / 'config.json'} is not a valid pyrajax config ({e}); re-convert the checkpoint "
                         "with pyrajax-convert") from None
    from pyrajax import sharding as sh
    sharded = sh.tp_size(mesh) > 1
    ckptr = ocp.StandardCheckpointer()
    target = None
    if sharded:  # each device reads only its own shards: no host ever holds the whole model
        try:
            meta = _metadata_tree(ckptr, path / "params")
        except Exception as e:
            raise _unreadable(path, e) from None
        try:
            check_tree(meta, cfg)  # a missing or misshapen weight is named before anything is read
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        target = _sharded_target(meta, cfg, mesh)
    try:
        tree = ckptr.restore(path / "params", target) if sharded else ckptr.restore(path / "params")
    except Exception as e:  # a missing or damaged array file, a torn OCDBT manifest
        raise _unreadable(path, e) from None
    try:
        named = check_tree(tree, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    # Refused rather than warned about: one NaN weight turns every logit NaN, and greedy decoding then emits
    # token 0 forever without any other sign of trouble.
    for name, w in named:
        bad = _nonfinite_on_device(w) if sharded else nonfinite(w)
        if bad:
            raise ValueError(f"weight {name} in {path} holds {bad}; the checkpoint is damaged, re-convert it "
                             "from a good source")
    if not sharded:
        return from_tree(cast(tree, dtype), cfg), cfg
    to_dtype = jax.jit(lambda a: a.astype(dtype))  # on device, in the array's own sharding

    def converted(w):
        if w.dtype == jnp.dtype(dtype):
            return w
        out = to_dtype(w)
        w.delete()
        return out
    return sh.fuse_sharded(jax.tree.map(converted, tree), cfg, mesh), cfg


def _unreadable(path: Path, e: Exception) -> ValueError:
    detail = str(e).split(" [tensorstore_spec=")[0].strip().splitlines()
    return ValueError(f"cannot read the weights in {path / 'params'} ({type(e).__name__}: "
                      f"{detail[0] if detail else ''}); the checkpoint is incomplete or damaged, re-convert it "
                      "with pyrajax-convert")
