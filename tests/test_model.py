"""The functional LLaMA and the full-cache generation path against HF transformers (torch, float32)."""
from __future__ import annotations

import numpy as np
import pytest
import jax.numpy as jnp
import torch

import pyrajax
from checkpoints_convert import convert
from pyrajax.generate import TRACE_COUNTS

CHAT = ["What is the capital of France?", "Write a haiku about the sea.",
        "List three prime numbers greater than ten, and explain briefly why each one is prime."]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tiny_hf(heads: int, kv_heads: int, tied: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    hc = LlamaConfig(vocab_size=211, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=5000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=tied, max_position_embeddings=256,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(hc).eval()


@pytest.mark.parametrize("heads,kv_heads,tied", [(4, 4, False), (6, 2, False), (4, 1, True), (6, 3, True)])
def test_logits_match_hf_tiny(tmp_path, heads, kv_heads, tied):
    hf = tiny_hf(heads, kv_heads, tied, seed=heads * 10 + kv_heads)
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ck", dtype="float32", progress=False)
    params, cfg = pyrajax.load(tmp_path / "ck", dtype=jnp.float32)
    assert cfg.tie_embeddings == tied and cfg.num_kv_heads == kv_heads
    toks = np.random.default_rng(heads).integers(0, 211, size=(2, 23))
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    out = np.asarray(pyrajax.logits(params, toks, cfg))
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-4


def test_logits_match_hf_smollm2(smol, smol_hf):
    params, cfg = smol
    tok = pyrajax.get_tokenizer(cfg)
    ids = tok.encode("The capital of France is Paris. The capital of Germany is Berlin, and the capital of")
    with torch.no_grad():
        ref = smol_hf(torch.tensor([ids])).logits.numpy()
    out = np.asarray(pyrajax.logits(params, [ids], cfg))
    assert rel_err(out, ref) <= 1e-4


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def hf_greedy(model, ids: list[int], n: int, stop: tuple[int, ...]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=list(stop), pad_token_id=stop[0])
    gen = out[0, len(ids):].tolist()
    for i, t in enumerate(gen):
        if t in stop:
            return gen[:i]
    return gen


def test_greedy_matches_hf_and_is_batch_invariant(smol, smol_hf):
    params, cfg = smol
    gcfg = pyrajax.GenerationConfig(model=cfg, max_new_tokens=32)
    tok = pyrajax.get_tokenizer(gcfg)
    prompts = [chat_ids(tok, c) for c in CHAT]
    assert len({len(p) for p in prompts}) == 3  # a ragged batch
    batch = pyrajax.generate(params, prompts, gcfg)
    for p, got in zip(prompts, batch.tokens):
        assert got == hf_greedy(smol_hf, p, 32, cfg.eos_ids)
    alone = [pyrajax.generate(params, [p], gcfg).tokens[0] for p in prompts]
    assert alone == batch.tokens
    assert "Paris" in batch.texts[0]


def test_string_prompts_and_stats(smol):
    params, cfg = smol
    r = pyrajax.generate(params, ["The capital of France is"], pyrajax.GenerationConfig(model=cfg, max_new_tokens=8))
    assert isinstance(r.texts[0], str) and len(r.tokens[0]) <= 8
    s = r.stats
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * 4
    assert s["kv_bytes"] == sum(s["kv_bytes_per_layer"]) == cfg.num_layers * (s["prompt_bucket"] + s["new_bucket"]) * per_token
    assert s["kv_fraction"] == 1.0 and s["prefill_seconds"] > 0 and s["decode_seconds"] > 0
    n_prompt = len(pyrajax.get_tokenizer(cfg).encode("The capital of France is"))
    assert s["lengths_after_prefill"] == [[n_prompt] * cfg.num_layers]


@pytest.fixture(scope="module")
def tiny():
    import jax
    cfg = pyrajax.preset("tiny")
    return pyrajax.random_params(jax.random.key(1), cfg, scale=0.2), cfg


def test_one_compilation_per_bucket(tiny):
    params, cfg = tiny
    gcfg = pyrajax.GenerationConfig(model=cfg, max_new_tokens=10, cache="paper")
    pyrajax.generate(params, [[5, 6, 7], [8] * 11], gcfg)  # bucket: 16 tokens, batch 2, 16 new
    before = dict(TRACE_COUNTS)
    rng = np.random.default_rng(0)
    for _ in range(3):  # different prompts, lengths, selections and step counts in the same bucket
        prompts = [rng.integers(3, 256, rng.integers(1, 17)).tolist() for _ in range(2)]
        new = int(rng.integers(1, 17))
        r = pyrajax.generate(params, prompts, pyrajax.GenerationConfig(model=cfg, max_new_tokens=new, cache="paper",
                                                                       seed=int(rng.integers(100))))
        assert all(len(t) <= new for t in r.tokens)
    assert dict(TRACE_COUNTS) == before
    pyrajax.generate(params, [[5] * 17], gcfg)  # a new bucket compiles once more
    assert TRACE_COUNTS["prefill"] == before["prefill"] + 1


def test_sampling_is_seeded_and_respects_top_k(tiny):
    params, cfg = tiny
    mk = lambda seed, **kw: pyrajax.GenerationConfig(model=cfg, max_new_tokens=12, temperature=1.0, seed=seed,
                                                     stop_ids=(), **kw)
    a = pyrajax.generate(params, [[5, 6, 7]], mk(3)).tokens
    assert a == pyrajax.generate(params, [[5, 6, 7]], mk(3)).tokens
    assert a != pyrajax.generate(params, [[5, 6, 7]], mk(4)).tokens
    greedy = pyrajax.generate(params, [[5, 6, 7]], pyrajax.GenerationConfig(model=cfg, max_new_tokens=12, stop_ids=()))
    assert pyrajax.generate(params, [[5, 6, 7]], mk(3, top_k=1)).tokens == greedy.tokens
    assert pyrajax.generate(params, [[5, 6, 7]], mk(3, top_p=1e-6)).tokens == greedy.tokens


def test_stop_ids_end_each_sequence(tiny):
    params, cfg = tiny
    free = pyrajax.generate(params, [[5, 6, 7], [9, 9]], pyrajax.GenerationConfig(model=cfg, max_new_tokens=12, stop_ids=()))
    stop = free.tokens[0][3]
    r = pyrajax.generate(params, [[5, 6, 7], [9, 9]], pyrajax.GenerationConfig(model=cfg, max_new_tokens=12, stop_ids=(stop,)))
    assert r.tokens[0] == free.tokens[0][:free.tokens[0].index(stop)]
    cut = free.tokens[1].index(stop) if stop in free.tokens[1] else 12
    assert r.tokens[1] == free.tokens[1][:cut]


@pytest.mark.parametrize("prompts,kw,match", [
    ([], {}, "non-empty list"),
    ([[5, 6], []], {}, "prompt 1 is empty"),
    ([[5, 256]], {}, "outside the vocabulary"),
    ([[5, -1]], {}, "outside the vocabulary"),
    ([[5] * 1000], {"max_new_tokens": 30}, "exceeds the model's 1024 positions"),
    (["hello"], {}, "no tokenizer is known"),
])
def test_generate_rejects_bad_input(tiny, prompts, kw, match):
    params, cfg = tiny
    with pytest.raises(ValueError, match=match):
        pyrajax.generate(params, prompts, pyrajax.GenerationConfig(model=cfg, **kw))


@pytest.mark.parametrize("kw,match", [({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": -3}, "max_new_tokens"),
                                      ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                      ({"cache": "nonsense"}, "unknown cache preset")])
def test_generation_config_rejects_bad_settings(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        pyrajax.GenerationConfig(model=tiny[1], **kw)


def test_generate_rejects_params_of_another_config(tiny):
    import dataclasses
    params, cfg = tiny
    other = dataclasses.replace(cfg, dim=32)
    with pytest.raises(ValueError, match="do not belong to this config"):
        pyrajax.generate(params, [[5]], pyrajax.GenerationConfig(model=other))
    with pytest.raises(ValueError, match="layers"):
        pyrajax.generate(params, [[5]], pyrajax.GenerationConfig(model=dataclasses.replace(cfg, num_layers=3)))
