"""Weights as a registered pytree, and their orbax checkpoint format.

Matrices are stored [in, out] so that `x @ w` is the forward map. Q/K projection columns use the HF
("rotate-half") rotary layout: within each head, the first half of the features pairs with the second half.
"""
from __future__ import annotations

import ctypes
import errno
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

LAYER_FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [D]
    wq: jax.Array  # [D, H*hd]
    wk: jax.Array  # [D, K*hd]
    wv: jax.Array  # [D, K*hd]
    wo: jax.Array  # [H*hd, D]
    mlp_norm: jax.Array  # [D]
    w_gate: jax.Array  # [D, F]
    w_up: jax.Array  # [D, F]
    w_down: jax.Array  # [F, D]


@struct.dataclass
class Params:
    embed: jax.Array  # [V, D]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V]; None when tied to `embed`


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every weight of one layer and of the globals, keyed by field name."""
    D, F, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    return {
        "embed": (cfg.vocab_size, D), "final_norm": (D,), "lm_head": (D, cfg.vocab_size),
        "attn_norm": (D,), "wq": (D, cfg.num_heads * hd), "wk": (D, cfg.num_kv_heads * hd),
        "wv": (D, cfg.num_kv_heads * hd), "wo": (cfg.num_heads * hd, D), "mlp_norm": (D,),
        "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D),
    }


def named_weights(params: Params) -> list[tuple[str, jax.Array]]:
    """Every weight with its checkpoint name ("embed", "layers.3.wq", ...)."""
    named = [("embed", params.embed), ("final_norm", params.final_norm)]
    if params.lm_head is not None:
        named.append(("lm_head", params.lm_head))
    for i, layer in enumerate(params.layers):
        named += [(f"layers.{i}.{f}", getattr(layer, f)) for f in LAYER_FIELDS]
    return named


def check_params(params: Params, cfg: ModelConfig) -> None:
    """Raise ValueError naming the first weight whose shape does not match `cfg`."""
    shapes = expected_shapes(cfg)
    if len(params.layers) != cfg.num_layers:
        raise ValueError(f"params have {len(params.layers)} layers but the config says {cfg.num_layers}; "
                         "load the params and config from the same checkpoint")
    if (params.lm_head is None) != cfg.tie_embeddings:
        raise ValueError(f"config.tie_embeddings={cfg.tie_embeddings} but params "
                         f"{'lack' if params.lm_head is None else 'have'} an lm_head")
    for name, arr in named_weights(params):
        want = shapes[name.rpartition(".")[2]]
        if tuple(arr.shape) != want:
            raise ValueError(f"weight {name} has shape {tuple(arr.shape)} but the config needs {want}; "
                             "the params do not belong to this config")


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


def random_params(key: jax.Array, cfg: ModelConfig, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random weights of the exact shapes of `cfg` (tests and benchmarks; created on the default device)."""
    shapes = expected_shapes(cfg)
    keys = iter(jax.random.split(key, 3 + 9 * cfg.num_layers))

    def init(name):
        k = next(keys)
        if name.endswith("norm"):
            return (1.0 + 0.1 * jax.random.normal(k, shapes[name])).astype(dtype)
        return (scale * jax.random.normal(k, shapes[name])).astype(dtype)

    layers = tuple(LayerParams(**{f: init(f) for f in LAYER_FIELDS}) for _ in range(cfg.num_layers))
    lm_head = None if cfg.tie_embeddings else init("lm_head")
    return Params(embed=init("embed"), layers=layers, final_norm=init("final_norm"), lm_head=lm_head)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint directory:  config.json, params/ (orbax), tokenizer/ (optional, HF tokenizer files)

def to_tree(params: Params) -> dict:
    tree = {"embed": params.embed, "final_norm": params.final_norm,
            "layers": {str(i): {f: getattr(l, f) for f in LAYER_FIELDS} for i, l in enumerate(params.layers)}}
    if params.lm_head is not None:
        tree["lm_head"] = params.lm_head
    return tree


def from_tree(tree: dict, cfg: ModelConfig) -> Params:
    def get(*keys):
        node = tree
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                raise ValueError(f"checkpoint is missing weight {'.'.join(keys)}; re-convert it with pyrajax-convert")
            node = node[k]
        return node

    layers = tuple(LayerParams(**{f: get("layers", str(i), f) for f in LAYER_FIELDS}) for i in range(cfg.num_layers))
    params = Params(embed=get("embed"), layers=layers, final_norm=get("final_norm"),
                    lm_head=tree.get("lm_head") if cfg.tie_embeddings else get("lm_head"))
    check_params(params, cfg)
    return params


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


def load_checkpoint(path: str | Path, dtype=jnp.bfloat16) -> tuple[Params, ModelConfig]:
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
    try:
        tree = ocp.StandardCheckpointer().restore(path / "params")
    except Exception as e:  # a missing or damaged array file, a torn OCDBT manifest
        detail = str(e).split(" [tensorstore_spec=")[0].strip().splitlines()
        raise ValueError(f"cannot read the weights in {path / 'params'} ({type(e).__name__}: "
                         f"{detail[0] if detail else ''}); the checkpoint is incomplete or damaged, re-convert it "
                         "with pyrajax-convert") from None
    try:
        params = from_tree(tree, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    # Refused rather than warned about: one NaN weight turns every logit NaN, and greedy decoding then emits
    # token 0 forever without any other sign of trouble.
    for name, w in named_weights(params):
        bad = nonfinite(w)
        if bad:
            raise ValueError(f"weight {name} in {path} holds {bad}; the checkpoint is damaged, re-convert it "
                             "from a good source")
    return cast(params, dtype), cfg
