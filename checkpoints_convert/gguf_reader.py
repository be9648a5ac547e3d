"""llama-architecture GGUF files (llama.cpp), dequantized with the `gguf` package."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from checkpoints_convert import ConversionError, Source, make_config, one_line

SUPPORTED_ARCHITECTURES = ("llama",)
GLOBAL_KEYS = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
LAYER_KEYS = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "wo": "blk.{i}.attn_output.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight",
    "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight",
}


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _f32(x) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def open_gguf(path: Path) -> Source:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ConversionError(f"cannot read {path} ({type(e).__name__}: {one_line(e)}); the GGUF file is "
                              "corrupt or truncated, re-download it") from None

    def meta(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = meta("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"{path} is a GGUF of architecture {arch!r}; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    scaling = meta("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ConversionError(f"{path} uses rope scaling {scaling!r}, which pyrajax does not support")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ConversionError(f"{path} carries rope_freqs (LLaMA-3.1 rope scaling), which pyrajax does not "
                              "support; only plain RoPE is supported")
    try:
        dim, heads = meta("llama.embedding_length"), meta("llama.attention.head_count")
        head_dim = meta("llama.attention.key_length") or dim // heads
        rot = meta("llama.rope.dimension_count", head_dim)
        if rot != head_dim:
            raise ConversionError(f"{path} rotates {rot} of {head_dim} head features (partial RoPE); "
                                  "pyrajax supports full-head RoPE only")
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = meta("llama.vocab_size") or (len(tokens.data) if tokens is not None else
                                               int(tensors["token_embd.weight"].shape[-1]))
        eos = meta("tokenizer.ggml.eos_token_id", 2)
        cfg = make_config(
            vocab_size=vocab, dim=dim, ffn_dim=meta("llama.feed_forward_length"),
            num_layers=meta("llama.block_count"), num_heads=heads,
            num_kv_heads=meta("llama.attention.head_count_kv") or heads, head_dim=head_dim,
            rope_theta=_f32(meta("llama.rope.freq_base", 10000.0)),
            norm_eps=_f32(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            max_positions=meta("llama.context_length", 4096),
            tie_embeddings="output.weight" not in tensors,  # as transformers' GGUF loader decides
            bos_id=meta("tokenizer.ggml.bos_token_id"), eos_ids=(eos,),
            pad_id=meta("tokenizer.ggml.padding_token_id", eos))
    except KeyError as e:
        raise ConversionError(f"{path} lacks tensor {e}; the GGUF file is incomplete") from None

    def load(t):
        return gguf.quants.dequantize(t.data, t.tensor_type)

    def tokenizer(out: Path):
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))

    return Source(cfg=cfg, loaders={n: (lambda t=t: load(t)) for n, t in tensors.items()},
                  global_keys=GLOBAL_KEYS, layer_keys=LAYER_KEYS, interleaved_qk=True,
                  tokenizer=tokenizer if "tokenizer.ggml.model" in reader.fields else None,
                  description=f"GGUF file {path}")
