"""Convert HF, Meta and GGUF LLaMA checkpoints into pyrajax checkpoints (see `cli.py` for the command).

Each reader (`hf`, `meta`, `gguf_reader`) turns its source into a `Source`: a ModelConfig, lazy loaders for
every tensor it holds (PyTorch layout: matrices [out, in]), and a key map from pyrajax weight names to source
tensor names. `build_params` is the one place that checks shapes, fixes the rotary layout, transposes to
[in, out] and casts.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from pyrajax.config import ModelConfig
from pyrajax import validate
from pyrajax.params import LAYER_FIELDS, Params, expected_shapes, fuse_layer, nonfinite, save_checkpoint

DTYPES = validate.DTYPES
SUPPORTED = ("an HF LLaMA directory (config.json + model*.safetensors or pytorch_model*.bin), "
             "a Meta LLaMA-2 directory (params.json + consolidated.NN.pth) or a llama .gguf file")


class ConversionError(Exception):
    """A conversion failed for a reason the user can fix; the message says how."""


def one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


@dataclasses.dataclass
class Source:
    cfg: ModelConfig
    loaders: dict[str, Callable[[], np.ndarray]]  # every tensor in the source, by source name
    global_keys: dict[str, str]  # pyrajax global name ("embed", "final_norm", "lm_head") -> source name
    layer_keys: dict[str, str]  # pyrajax layer field -> source name template with "{i}"
    interleaved_qk: bool = False  # q/k rows in Meta's interleaved rotary layout (Meta, llama.cpp)
    ignored: Callable[[str], bool] = lambda name: False  # source tensors that may be left unused
    tokenizer: Callable[[Path], None] | None = None  # writes HF tokenizer files into the given dir
    description: str = ""


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection [n_heads*hd, in] from interleaved to rotate-half rotary layout.

    The permutation of HF's convert_llama_weights_to_hf `permute` and of transformers' GGUF
    `_reverse_permute_weights`: within a head, row 2j+c moves to row c*hd/2 + j.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `interleaved_to_half` (what Meta and llama.cpp store)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read(src: Source, name: str) -> np.ndarray:
    if name not in src.loaders:
        raise ConversionError(f"{src.description} has no weight {name!r}; the checkpoint is incomplete, "
                              "re-download or re-export it")
    try:
        return np.asarray(src.loaders[name]())
    except ConversionError:
        raise
    except Exception as e:  # truncated/corrupt files surface here
        raise ConversionError(f"cannot read weight {name!r} from {src.description} ({type(e).__name__}: "
                              f"{one_line(e)}); the file is corrupt or truncated, re-download it") from None


def _convert_one(src: Source, field: str, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    w = _read(src, name)
    # Source layout: embedding [V, D], vectors [D], matrices [out, in].
    want = shape if field == "embed" or len(shape) == 1 else shape[::-1]
    if tuple(w.shape) != want:
        raise ConversionError(f"weight {name!r} has shape {tuple(w.shape)} but the config implies {want}; "
                              f"the weights of {src.description} do not match its config")
    if src.interleaved_qk and field in ("wq", "wk"):
        w = interleaved_to_half(w, src.cfg.num_heads if field == "wq" else src.cfg.num_kv_heads)
    if w.ndim == 2 and field != "embed":
        w = w.T
    bad = nonfinite(w)
    if bad:
        raise ConversionError(f"weight {name!r} of {src.description} holds {bad}; the source is damaged, "
                              "re-download it (pyrajax refuses non-finite weights: they make every logit NaN)")
    with np.errstate(over="ignore"):  # an overflow is reported below, with the weight's name
        out = np.ascontiguousarray(w.astype(dtype))
    bad = nonfinite(out)
    if bad:
        raise ConversionError(f"weight {name!r} of {src.description} does not fit {np.dtype(dtype).name}: "
                              f"casting it gives {bad}; convert with --dtype bfloat16 or float32")
    return out


def build_params(src: Source, dtype, progress: bool = True) -> Params:
    """Assemble pyrajax Params from a Source: shape checks, rotary layout, [in, out] transpose, dtype cast."""
    from tqdm import tqdm

    cfg, shapes = src.cfg, expected_shapes(src.cfg)
    wanted = [(g, None) for g in ("embed", "final_norm")] + ([] if cfg.tie_embeddings else [("lm_head", None)])
    wanted += [(f, i) for i in range(cfg.num_layers) for f in LAYER_FIELDS]
    names = {key: src.global_keys[key[0]] if key[1] is None else src.layer_keys[key[0]].format(i=key[1])
             for key in wanted}
    lm_name = src.global_keys["lm_head"]
    tied_lm_head = cfg.tie_embeddings and lm_name in src.loaders
    extra = sorted(set(src.loaders) - set(names.values()) - {lm_name if tied_lm_head else None})
    extra = [n for n in extra if not src.ignored(n)]
    beyond = [n for n in extra if any(n == t.format(i=cfg.num_layers) for t in src.layer_keys.values())]
    if beyond:
        raise ConversionError(f"{src.description} holds weights of more layers than its config's {cfg.num_layers}, "
                              f"e.g. {beyond[0]!r}; the config does not describe these weights, fix its layer count")
    if extra:
        raise ConversionError(f"{src.description} has {len(extra)} weight(s) a plain LLaMA does not use, e.g. "
                              f"{extra[0]!r}; only the plain LLaMA architecture is supported")
    out = {}
    with tqdm(wanted, desc="converting tensors", unit="tensor", disable=not progress) as bar:
        for field, i in bar:
            out[(field, i)] = _convert_one(src, field, names[(field, i)], shapes[field], dtype)
    if tied_lm_head and not np.array_equal(_read(src, lm_name).astype(dtype), out[("embed", None)]):
        raise ConversionError(f"the config ties the embeddings but {src.description} has a different "
                              f"{lm_name!r}; fix tie_word_embeddings in the config")
    layers = tuple(fuse_layer({f: out[(f, i)] for f in LAYER_FIELDS}, cfg) for i in range(cfg.num_layers))
    return Params(embed=out[("embed", None)], layers=layers, final_norm=out[("final_norm", None)],
                  lm_head=out.get(("lm_head", None)))


def make_config(**fields) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"invalid model config: {e}") from None


def open_source(src: str | Path) -> Source:
    """Detect the format of `src` and open it with the matching reader."""
    from checkpoints_convert import gguf_reader, hf, meta

    src = Path(src)
    if not src.exists():
        raise ConversionError(f"source {src} does not exist; pass {SUPPORTED}")
    if src.is_file() and gguf_reader.is_gguf(src):
        return gguf_reader.open_gguf(src)
    if src.is_dir() and (src / "config.json").is_file():
        return hf.open_hf(src)
    if src.is_dir() and (src / "params.json").is_file():
        return meta.open_meta(src)
    raise ConversionError(f"{src} is not a recognised checkpoint; pass {SUPPORTED}")


def convert(src: str | Path, dst: str | Path, dtype: str = "bfloat16", force: bool = False,
            progress: bool = True) -> Path:
    """Convert `src` into a pyrajax checkpoint at `dst`. Raises ConversionError; a failure leaves no `dst`."""
    try:
        dtype = validate.dtype(dtype)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    dst = Path(dst)
    if dst.exists() and not force:
        raise ConversionError(f"{dst} already exists; pass --force to overwrite it")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst} is a file, not a checkpoint directory; remove it or pick another DST")
    source = open_source(src)
    params = build_params(source, dtype, progress=progress)
    with tempfile.TemporaryDirectory(prefix="pyrajax-tok-") as tmp:
        tok_dir = None
        if source.tokenizer is not None:
            tok_dir = Path(tmp) / "tokenizer"
            try:
                source.tokenizer(tok_dir)
            except Exception as e:
                if isinstance(e, ImportError) or "Could not import module" in str(e):
                    raise ConversionError(
                        f"cannot convert the tokenizer of {source.description}: transformers needs torch for it "
                        f"({one_line(e)}); install the converter extra: pip install 'pyrajax[convert]' "
                        "(on a CPU-only Python 3.11 machine: pip install torch==2.13.0)") from None
                raise ConversionError(f"cannot convert the tokenizer of {source.description} "
                                      f"({type(e).__name__}: {one_line(e)}); fix or remove the tokenizer files") from None
        try:
            return save_checkpoint(params, source.cfg, dst, tokenizer_dir=tok_dir, force=force)
        except FileExistsError as e:
            raise ConversionError(str(e)) from None
