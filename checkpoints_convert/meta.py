"""Meta LLaMA-2 directories: params.json + consolidated.NN.pth model-parallel shards (+ tokenizer.model)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from checkpoints_convert import ConversionError, Source, make_config, one_line
from checkpoints_convert.hf import torch_load, to_numpy

GLOBAL_KEYS = {"embed": "tok_embeddings.weight", "final_norm": "norm.weight", "lm_head": "output.weight"}
LAYER_KEYS = {
    "attn_norm": "layers.{i}.attention_norm.weight",
    "wq": "layers.{i}.attention.wq.weight",
    "wk": "layers.{i}.attention.wk.weight",
    "wv": "layers.{i}.attention.wv.weight",
    "wo": "layers.{i}.attention.wo.weight",
    "mlp_norm": "layers.{i}.ffn_norm.weight",
    "w_gate": "layers.{i}.feed_forward.w1.weight",
    "w_up": "layers.{i}.feed_forward.w3.weight",
    "w_down": "layers.{i}.feed_forward.w2.weight",
}
# How Meta's model parallelism splits each tensor (the axis the shards concatenate on); None = replicated.
SPLIT_AXIS = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def split_axis(name: str) -> int | None:
    """The concatenation axis of a Meta tensor name, e.g. 'layers.3.attention.wo.weight' -> 1."""
    return SPLIT_AXIS.get(name.split(".")[-2])


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size (llama/model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _shards(src: Path) -> list[Path]:
    paths = sorted(src.glob("consolidated.*.pth"))
    numbers = [int(m.group(1)) for p in paths if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", p.name))]
    if not paths:
        raise ConversionError(f"{src} has params.json but no consolidated.NN.pth weights; download them")
    if sorted(numbers) != list(range(len(paths))):
        raise ConversionError(f"{src} has shards {[p.name for p in paths]}; expected consolidated.00.pth .. "
                              f"consolidated.{len(paths) - 1:02d}.pth with none missing")
    return paths


def _check_shard_set(src: Path, shards: list[dict], dim: int) -> None:
    """The shards' embedding slices add up to the model's width: a set missing its last shards is numbered
    without gaps, so only the columns tell."""
    held = sum(int(s["tok_embeddings.weight"].shape[1]) for s in shards if "tok_embeddings.weight" in s)
    if held and held != dim:
        per_shard = held // len(shards)
        ways = f" (split {dim // per_shard} ways)" if per_shard and dim % per_shard == 0 else ""
        raise ConversionError(f"{src} has {len(shards)} shard(s) holding {held} of the model's {dim} embedding "
                              f"columns: the shard set{ways} is incomplete, download every consolidated.NN.pth")


def open_meta(src: Path) -> Source:
    try:
        p = json.loads((src / "params.json").read_text())
    except ValueError as e:
        raise ConversionError(f"{src / 'params.json'} is not valid JSON ({one_line(e)}); fix or re-download it") from None
    if p.get("use_scaled_rope"):
        raise ConversionError(f"{src / 'params.json'} sets use_scaled_rope (LLaMA-3.1 rope scaling), which "
                              "pyrajax does not support; only plain RoPE is supported")
    shards = [torch_load(path) for path in _shards(src)]

    def merged(name):
        parts = [s[name] for s in shards if name in s]
        if len(parts) != len(shards):
            raise ConversionError(f"weight {name!r} is missing from some Meta shards; re-download them")
        axis = split_axis(name)
        return to_numpy(parts[0]) if axis is None or len(parts) == 1 else \
            np.concatenate([to_numpy(t) for t in parts], axis=axis)

    loaders = {name: (lambda name=name: merged(name)) for s in shards for name in s}

    tok_path = next((d / "tokenizer.model" for d in (src, src.parent) if (d / "tokenizer.model").is_file()), None)
    tok = None
    if tok_path is not None:
        try:
            from transformers import LlamaTokenizer
            tok = LlamaTokenizer.from_pretrained(str(tok_path.parent))
        except Exception as e:
            raise ConversionError(f"cannot load {tok_path} ({type(e).__name__}: {one_line(e)}); "
                                  "fix or remove it") from None
    try:
        vocab = p.get("vocab_size", -1)
        if vocab <= 0:  # LLaMA-2 params.json says -1: the tokenizer decides
            emb = shards[0].get("tok_embeddings.weight")
            if emb is None:
                raise ConversionError(f"{src} lacks tok_embeddings.weight; the checkpoint is incomplete")
            vocab = emb.shape[0]
        dim, heads = p["dim"], p["n_heads"]
        _check_shard_set(src, shards, dim)
        eos = tok.eos_token_id if tok is not None and tok.eos_token_id is not None else 2
        cfg = make_config(
            vocab_size=vocab, dim=dim, ffn_dim=ffn_dim(dim, p.get("multiple_of", 256), p.get("ffn_dim_multiplier")),
            num_layers=p["n_layers"], num_heads=heads, num_kv_heads=p.get("n_kv_heads") or heads,
            head_dim=dim // heads, rope_theta=float(p.get("rope_theta", 10000.0)),
            norm_eps=float(p.get("norm_eps", 1e-5)), max_positions=p.get("max_seq_len", 4096),
            tie_embeddings=False, bos_id=tok.bos_token_id if tok is not None else 1, eos_ids=(eos,),
            pad_id=0)  # Meta has no pad token; 0 (<unk>) as in HF's LLaMA-2 generation_config
    except KeyError as e:
        raise ConversionError(f"{src / 'params.json'} lacks {e}; it is not a complete LLaMA params.json") from None
    return Source(cfg=cfg, loaders=loaders, global_keys=GLOBAL_KEYS, layer_keys=LAYER_KEYS, interleaved_qk=True,
                  ignored=lambda n: n == "rope.freqs",
                  tokenizer=None if tok is None else (lambda out: tok.save_pretrained(str(out))),
                  description=f"Meta checkpoint {src}")
