"""Hugging Face LLaMA directories: config.json + (sharded) safetensors or pytorch_model*.bin."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from checkpoints_convert import ConversionError, Source, make_config, one_line

GLOBAL_KEYS = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
               "lm_head": "lm_head.weight"}
LAYER_KEYS = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "w_up": "model.layers.{i}.mlp.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.down_proj.weight",
}
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy (bf16 widened to f32, exactly)."""
    import torch

    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def config_from_hf(c: dict, where: str):
    if c.get("model_type") != "llama" or "LlamaForCausalLM" not in (c.get("architectures") or ["LlamaForCausalLM"]):
        raise ConversionError(f"{where} is model_type={c.get('model_type')!r} architectures="
                              f"{c.get('architectures')}; only llama (LlamaForCausalLM) is supported")
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ConversionError(f"{where} uses rope scaling {rope_type!r}, which pyrajax does not support; "
                              "only plain RoPE (rope_scaling null/default) is supported")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get(flag):
            raise ConversionError(f"{where} sets {flag}=true; only bias-free LLaMA is supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where} uses hidden_act={c['hidden_act']!r}; only silu is supported")
    try:
        heads = c["num_attention_heads"]
        eos = c.get("eos_token_id", 2)
        eos = tuple(e for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        pad = c.get("pad_token_id")
        pad = pad if pad is not None else eos[0] if eos else 0
        return make_config(
            vocab_size=c["vocab_size"], dim=c["hidden_size"], ffn_dim=c["intermediate_size"],
            num_layers=c["num_hidden_layers"], num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rope_theta=float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            max_positions=c.get("max_position_embeddings", 2048),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_id=c.get("bos_token_id"), eos_ids=eos, pad_id=pad)
    except KeyError as e:
        raise ConversionError(f"{where} lacks {e}; it is not a complete LLaMA config") from None


def _weight_loaders(src: Path) -> dict:
    """Lazy loaders for every tensor of the checkpoint, by name."""
    first = next((src / f for f in WEIGHT_FILES if (src / f).is_file()), None)
    if first is None:
        raise ConversionError(f"{src} has a config.json but no weights; expected one of {', '.join(WEIGHT_FILES)}")
    if first.name.endswith(".index.json"):
        try:
            weight_map = json.loads(first.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConversionError(f"{first} is not a valid shard index ({one_line(e)}); re-download it") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise ConversionError(f"{first.name} names shard {missing[0]} which is missing from {src}; "
                                  "download every shard")
    else:
        files, weight_map = [first.name], None
    loaders = {}
    for f in files:
        for name, load in _file_loaders(src / f).items():
            if weight_map is None or weight_map.get(name) == f:
                loaders[name] = load
    if weight_map is not None:  # keys the index promises but its shard lacks fail when read, not here
        for name, f in weight_map.items():
            loaders.setdefault(name, lambda name=name, f=f: _raise(f"shard {f} lacks weight {name!r}"))
    return loaders


def _raise(msg):
    raise ConversionError(msg + "; the checkpoint is incomplete, re-download it")


def torch_load(path: Path) -> dict:
    """A torch state dict file, memory-mapped where possible; ConversionError if unreadable."""
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"cannot read {path} ({type(e).__name__}: {one_line(e)}); the file is corrupt "
                              "or truncated, re-download it") from None


def _file_loaders(path: Path) -> dict:
    if path.suffix != ".safetensors":
        return {k: (lambda v=v: to_numpy(v)) for k, v in torch_load(path).items()}
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:
        raise ConversionError(f"cannot read {path} ({type(e).__name__}: {one_line(e)}); the file is corrupt "
                              "or truncated, re-download it") from None
    return {k: (lambda k=k: to_numpy(handle.get_tensor(k))) for k in handle.keys()}


def open_hf(src: Path) -> Source:
    try:
        raw = json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise ConversionError(f"{src / 'config.json'} is not valid JSON ({one_line(e)}); fix or re-download it") from None
    cfg = config_from_hf(raw, str(src / "config.json"))
    tokenizer = None
    if any((src / f).is_file() for f in TOKENIZER_FILES):
        def tokenizer(out: Path):
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return Source(cfg=cfg, loaders=_weight_loaders(src), global_keys=GLOBAL_KEYS, layer_keys=LAYER_KEYS,
                  ignored=lambda n: n.endswith("rotary_emb.inv_freq"), tokenizer=tokenizer,
                  description=f"HF checkpoint {src}")
