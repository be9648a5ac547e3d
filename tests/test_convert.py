"""pyrajax-convert: HF, Meta and GGUF sources against independent references, and every failure mode."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from checkpoints_convert import ConversionError, convert
from checkpoints_convert.cli import main
from checkpoints_convert.embedded import default_gguf_path, default_model_dir
from checkpoints_convert.meta import ffn_dim
from pyrajax.config import PRESETS, ModelConfig
from pyrajax.params import LAYER_FIELDS, load_checkpoint

# HF name of every pyrajax weight (written out here, independently of the converter's own key maps).
HF_LAYER = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
            "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
            "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
HF_TO_META = {"input_layernorm": "attention_norm", "self_attn.q_proj": "attention.wq",
              "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
              "self_attn.o_proj": "attention.wo", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
HF_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
HEADS, KV_HEADS, DIM, LAYERS = 4, 2, 64, 2


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of HF convert_llama_weights_to_hf's permute: rotate-half rows -> Meta/llama.cpp interleaved."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def tiny_hf_model(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=DIM, intermediate_size=192, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # norms too, so a mixed-up key cannot hide behind all-ones
            p.normal_()
    return model


def assert_equals_hf(path: Path, sd: dict, tied: bool, dtype=np.float32):
    params, cfg = load_checkpoint(path, jnp.float32)
    ref = lambda name: sd[name].float().numpy().astype(dtype).astype(np.float32)  # noqa: E731
    np.testing.assert_array_equal(params.embed, ref("model.embed_tokens.weight"))
    np.testing.assert_array_equal(params.final_norm, ref("model.norm.weight"))
    if tied:
        assert params.lm_head is None and cfg.tie_embeddings
    else:
        np.testing.assert_array_equal(params.lm_head, ref("lm_head.weight").T)
    for i, layer in enumerate(params.layers):
        for f in LAYER_FIELDS:
            want = ref(f"model.layers.{i}.{HF_LAYER[f]}.weight")
            np.testing.assert_array_equal(getattr(layer, f), want.T if want.ndim == 2 else want, err_msg=f"{i}.{f}")
    return params, cfg


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{name: (dir, state_dict, tied)}: sharded safetensors (untied GQA, tied) and .bin (single, sharded)."""
    root, out = tmp_path_factory.mktemp("hf"), {}
    for tied in (False, True):
        model = tiny_hf_model(tied)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        d = root / f"st-{'tied' if tied else 'untied'}"
        model.save_pretrained(d, max_shard_size="200KB")
        assert (d / "model.safetensors.index.json").is_file()
        out[d.name] = (d, sd, tied)
        b = root / f"bin-{'tied' if tied else 'untied'}"  # transformers 5 writes no .bin: write it as old versions did
        b.mkdir()
        shutil.copy(d / "config.json", b)
        if tied:  # single file, with the (equal) tied lm_head.weight present
            torch.save(sd, b / "pytorch_model.bin")
        else:  # two shards + index
            names = sorted(sd)
            halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
            for fname, keys in halves.items():
                torch.save({k: sd[k] for k in keys}, b / fname)
            index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
            (b / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        out[b.name] = (b, sd, tied)
    return out


@pytest.mark.parametrize("name", ["st-untied", "st-tied", "bin-untied", "bin-tied"])
def test_hf_exact(hf_dirs, tmp_path, name):
    src, sd, tied = hf_dirs[name]
    assert main([str(src), str(tmp_path / "ck"), "--dtype", "float32"]) == 0
    _, cfg = assert_equals_hf(tmp_path / "ck", sd, tied)
    assert cfg == ModelConfig(vocab_size=96, dim=DIM, ffn_dim=192, num_layers=LAYERS, num_heads=HEADS,
                              num_kv_heads=KV_HEADS, head_dim=DIM // HEADS, rope_theta=10000.0, norm_eps=1e-5,
                              max_positions=4096, tie_embeddings=tied, bos_id=1, eos_ids=(2,), pad_id=0)


def test_hf_default_dtype_is_bf16_rounding(hf_dirs, tmp_path):
    src, sd, tied = hf_dirs["st-untied"]
    convert(src, tmp_path / "ck", progress=False)
    assert_equals_hf(tmp_path / "ck", sd, tied, dtype=ml_dtypes.bfloat16)


def write_meta(sd: dict, path: Path, n_shards: int = 2):
    """A Meta LLaMA-2 directory, split across model-parallel shards the way Meta's checkpoints are."""
    path.mkdir(parents=True)
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(LAYERS):
        for hf_name, meta_name in HF_TO_META.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name.endswith(("q_proj", "k_proj")):
                w = to_interleaved(w, HEADS if hf_name.endswith("q_proj") else KV_HEADS)
            meta[f"layers.{i}.{meta_name}.weight"] = w
    axis = lambda name: {"tok_embeddings": 1, "wo": 1, "w2": 1}.get(name.split(".")[-2], 0)  # noqa: E731
    for s in range(n_shards):
        shard = {k: (v if v.ndim == 1 else v.chunk(n_shards, dim=axis(k))[s]).clone() for k, v in meta.items()}
        shard["rope.freqs"] = 1.0 / 10000 ** (torch.arange(0, DIM // HEADS, 2).float() / (DIM // HEADS))
        torch.save(shard, path / f"consolidated.{s:02d}.pth")
    (path / "params.json").write_text(json.dumps({"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS,
                                                  "n_kv_heads": KV_HEADS, "multiple_of": 32, "norm_eps": 1e-5,
                                                  "vocab_size": -1}))


def test_meta_ffn_formula():
    assert ffn_dim(4096, 256, None) == PRESETS["llama2-7b"].ffn_dim
    assert ffn_dim(5120, 256, None) == PRESETS["llama2-13b"].ffn_dim
    assert ffn_dim(8192, 4096, 1.3) == PRESETS["llama2-70b"].ffn_dim
    assert ffn_dim(DIM, 32, None) == 192


def test_meta_equals_hf(hf_dirs, tmp_path):
    import sentencepiece as spm

    src, sd, _ = hf_dirs["st-untied"]
    write_meta(sd, tmp_path / "meta" / "llama-2-tiny")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "meta" / "tokenizer"),
                                   vocab_size=40, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    assert main([str(src), str(tmp_path / "from_hf"), "--dtype", "float32"]) == 0
    assert main([str(tmp_path / "meta" / "llama-2-tiny"), str(tmp_path / "from_meta"), "--dtype", "float32"]) == 0
    p_hf, c_hf = load_checkpoint(tmp_path / "from_hf", jnp.float32)
    p_meta, c_meta = load_checkpoint(tmp_path / "from_meta", jnp.float32)
    assert c_meta == c_hf
    for a, b in zip(*(jax.tree.leaves(p) for p in (p_hf, p_meta)), strict=True):
        np.testing.assert_array_equal(a, b)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "from_meta" / "tokenizer")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "meta" / "tokenizer.model"))
    assert tok("the lazy fox", add_special_tokens=False)["input_ids"] == sp.encode("the lazy fox")
    hf_tok = Path(shutil.copytree(src, tmp_path / "hf_with_tokenizer"))  # HF dirs carry their tokenizer over too
    for f in (tmp_path / "from_meta" / "tokenizer").iterdir():
        shutil.copy(f, hf_tok)
    assert main([str(hf_tok), str(tmp_path / "hf_tok_ck"), "--dtype", "float32"]) == 0
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "hf_tok_ck" / "tokenizer")
    assert tok2("the lazy fox")["input_ids"] == tok("the lazy fox")["input_ids"]


def write_tiny_gguf(sd: dict, path: Path, tied: bool, arch: str = "llama"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(4096)
    w.add_embedding_length(DIM)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(192)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(96)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    if not tied:
        w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    for i in range(LAYERS):
        for hf_name, g in HF_TO_GGUF.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name.endswith(("q_proj", "k_proj")):
                t = to_interleaved(t, HEADS if hf_name.endswith("q_proj") else KV_HEADS)
            w.add_tensor(f"blk.{i}.{g}.weight", t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", ["st-untied", "st-tied"])
def test_tiny_gguf_exact(hf_dirs, tmp_path, name):
    _, sd, tied = hf_dirs[name]
    write_tiny_gguf(sd, tmp_path / "tiny.gguf", tied)
    assert main([str(tmp_path / "tiny.gguf"), str(tmp_path / "ck"), "--dtype", "float32"]) == 0
    assert_equals_hf(tmp_path / "ck", sd, tied)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2 GGUF and its converted checkpoint, cached across runs ($PYRAJAX_CACHE or default)."""
    try:
        return default_gguf_path(), default_model_dir()
    except ConversionError as e:
        pytest.skip(f"embedded model unavailable: {e}")


def test_embedded_gguf_matches_transformers(embedded):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, ck = embedded
    params, cfg = load_checkpoint(ck, jnp.float32)
    assert cfg == PRESETS["smollm2-135m"]
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    assert model.config.tie_word_embeddings and params.lm_head is None
    sd = model.state_dict()

    def close(ours, name, transpose=True):
        ref = sd[name].numpy()
        ref = ref.T if transpose and ref.ndim == 2 else ref
        assert ours.shape == ref.shape, name
        assert np.abs(np.asarray(ours) - ref).max() <= 1e-6 * np.abs(ref).max(), name

    close(params.embed, "model.embed_tokens.weight", transpose=False)
    close(params.final_norm, "model.norm.weight")
    for i, layer in enumerate(params.layers):
        for f in LAYER_FIELDS:
            close(getattr(layer, f), f"model.layers.{i}.{HF_LAYER[f]}.weight")
    ours = AutoTokenizer.from_pretrained(ck / "tokenizer")
    theirs = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    text = "Hello, SmolLM! What's 2+2?"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.eos_token_id in cfg.eos_ids


# ---------------------------------------------------------------------------------------------------------
# Failures: exit code 2, one line, no traceback, no DST, no temporary leftovers.

def run_failing(capsys, src, dst, *extra, expect: str):
    rc = main([str(src), str(dst), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expect in err, err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("pyrajax-convert: error:"), err
    assert not Path(dst).exists() or Path(dst, "marker").is_file()
    assert not [p for p in Path(dst).parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    return err


@pytest.fixture
def hf_copy(hf_dirs, tmp_path):
    def copy(name="st-untied"):
        return Path(shutil.copytree(hf_dirs[name][0], tmp_path / f"src-{name}"))
    return copy


def edit_config(src: Path, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def test_error_src_missing_or_unrecognised(capsys, tmp_path):
    run_failing(capsys, tmp_path / "nope", tmp_path / "out", expect="does not exist")
    (tmp_path / "empty").mkdir()
    err = run_failing(capsys, tmp_path / "empty", tmp_path / "out", expect="not a recognised checkpoint")
    assert "HF" in err and "Meta" in err and ".gguf" in err
    (tmp_path / "x.bin").write_bytes(b"junk")
    run_failing(capsys, tmp_path / "x.bin", tmp_path / "out", expect="not a recognised checkpoint")


def test_error_bad_weight_files(capsys, hf_copy, tmp_path):
    src = hf_copy()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    run_failing(capsys, src, tmp_path / "out", expect="corrupt or truncated")
    shard.unlink()
    run_failing(capsys, src, tmp_path / "out", expect=f"names shard {shard.name} which is missing")
    shard.write_bytes(data)
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    run_failing(capsys, src, tmp_path / "out", expect="no weight 'model.layers.1.mlp.down_proj.weight'")
    for f in src.glob("model*.safetensors*"):
        f.unlink()
    run_failing(capsys, src, tmp_path / "out", expect="no weights")


def single_file_source(hf_dirs, tmp_path, edit) -> Path:
    """The untied tiny HF checkpoint as one model.safetensors, its state dict changed by `edit` first."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(hf_dirs["st-untied"][0] / "config.json", src)
    sd = dict(hf_dirs["st-untied"][1])
    edit(sd)
    save_file(sd, src / "model.safetensors")
    return src


def test_error_missing_key_single_file(capsys, hf_dirs, tmp_path):
    src = single_file_source(hf_dirs, tmp_path, lambda sd: sd.pop("model.norm.weight"))
    run_failing(capsys, src, tmp_path / "out", expect="no weight 'model.norm.weight'")


def test_error_extra_weights_and_meta_shards(capsys, hf_dirs, tmp_path):
    src = single_file_source(hf_dirs, tmp_path,
                             lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(DIM)}))
    run_failing(capsys, src, tmp_path / "out", expect="only the plain LLaMA architecture is supported")
    write_meta(hf_dirs["st-untied"][1], tmp_path / "meta")
    (tmp_path / "meta" / "consolidated.00.pth").unlink()
    run_failing(capsys, tmp_path / "meta", tmp_path / "out", expect="with none missing")


def test_embedded_cache_hit_and_download_error(tmp_path, monkeypatch):
    import checkpoints_convert.embedded as emb

    (tmp_path / "hit" / emb.MODEL_NAME).mkdir(parents=True)
    (tmp_path / "hit" / emb.MODEL_NAME / "config.json").write_text("{}")
    monkeypatch.setattr(emb.subprocess, "run", lambda *a, **k: pytest.fail("no download on a cache hit"))
    monkeypatch.setenv("PYRAJAX_CACHE", str(tmp_path / "hit"))
    assert emb.default_model_dir() == tmp_path / "hit" / emb.MODEL_NAME
    monkeypatch.setattr(emb.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "ERROR: boom"))
    with pytest.raises(ConversionError, match="cannot download the default model .*ERROR: boom"):
        emb.default_model_dir(tmp_path / "miss")
    assert not [p for p in (tmp_path / "miss").iterdir()]


def test_error_config_problems(capsys, hf_copy, tmp_path):
    src = hf_copy()
    edit_config(src, model_type="mistral", architectures=["MistralForCausalLM"])
    run_failing(capsys, src, tmp_path / "out", expect="only llama (LlamaForCausalLM) is supported")
    edit_config(src, model_type="llama", architectures=["LlamaForCausalLM"],
                rope_scaling={"rope_type": "linear", "factor": 2.0})
    run_failing(capsys, src, tmp_path / "out", expect="rope scaling 'linear'")
    edit_config(src, rope_scaling=None, intermediate_size=256)
    run_failing(capsys, src, tmp_path / "out", expect="do not match its config")


def test_error_tied_but_different_lm_head(capsys, hf_dirs, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(hf_dirs["st-untied"][0] / "config.json", src)
    edit_config(src, tie_word_embeddings=True)
    torch.save(hf_dirs["st-untied"][1], src / "pytorch_model.bin")
    run_failing(capsys, src, tmp_path / "out", expect="different 'lm_head.weight'")


def test_error_gguf(capsys, hf_dirs, tmp_path):
    sd = hf_dirs["st-untied"][1]
    write_tiny_gguf(sd, tmp_path / "gpt2.gguf", tied=False, arch="gpt2")
    run_failing(capsys, tmp_path / "gpt2.gguf", tmp_path / "out", expect="supported: llama")
    write_tiny_gguf(sd, tmp_path / "ok.gguf", tied=False)
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 5000])
    run_failing(capsys, tmp_path / "cut.gguf", tmp_path / "out", expect="corrupt or truncated")


def test_error_unknown_dtype(capsys, hf_dirs, tmp_path):
    run_failing(capsys, hf_dirs["st-untied"][0], tmp_path / "out", "--dtype", "int8",
                expect="unknown dtype 'int8'; use one of bfloat16, float16, float32")


def test_existing_dst_needs_force(capsys, hf_dirs, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "marker").write_text("keep me")
    run_failing(capsys, hf_dirs["st-untied"][0], dst, expect="pass --force")
    assert (dst / "marker").read_text() == "keep me"
    bad = tmp_path / "bad"
    shutil.copytree(hf_dirs["st-untied"][0], bad)
    edit_config(bad, intermediate_size=256)  # a failing --force run leaves the old DST alone too
    run_failing(capsys, bad, dst, "--force", expect="do not match")
    assert (dst / "marker").read_text() == "keep me"
    assert main([str(hf_dirs["st-untied"][0]), str(dst), "--force", "--dtype", "float16"]) == 0
    assert not (dst / "marker").exists()
    assert_equals_hf(dst, hf_dirs["st-untied"][1], tied=False, dtype=np.float16)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_cli_process_exit_code(tmp_path):
    run = subprocess.run([sys.executable, "-m", "checkpoints_convert.cli", str(tmp_path / "nope"),
                          str(tmp_path / "out")], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 2
    assert run.stderr.startswith("pyrajax-convert: error:") and run.stderr.count("\n") == 1, run.stderr
