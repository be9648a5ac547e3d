"""Checkpoints that are not what they claim: each gets one clear error, and a failed conversion leaves no DST.

Covered in test_convert.py already (same tiny sources): a shard cut in half, an index naming a missing shard,
an HF config whose sizes disagree with the tensors, a GGUF of another architecture, a Meta set missing its
first shard. Here: the rest, for the converter and for `pyrajax.load` of a converted checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import pyrajax
from checkpoints_convert.cli import main
from tests.test_convert import (edit_config, hf_copy, hf_dirs, run_failing, single_file_source,  # noqa: F401
                                write_meta)

WEIGHT = "model.layers.1.mlp.down_proj.weight"


def test_shard_missing_its_last_bytes(capsys, hf_copy, tmp_path):  # noqa: F811
    src = hf_copy()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][WEIGHT]
    shard.write_bytes(shard.read_bytes()[:-64])  # header intact, the last tensor's data short
    run_failing(capsys, src, tmp_path / "out", expect="corrupt or truncated")


def test_meta_set_missing_its_last_shard(capsys, hf_dirs, tmp_path):  # noqa: F811
    write_meta(hf_dirs["st-untied"][1], tmp_path / "meta", n_shards=2)
    (tmp_path / "meta" / "consolidated.01.pth").unlink()  # the numbering 00.. stays gapless
    run_failing(capsys, tmp_path / "meta", tmp_path / "out",
                expect="1 shard(s) holding 32 of the model's 64 embedding columns: the shard set (split 2 ways) "
                       "is incomplete")


@pytest.mark.parametrize("layers,expect", [(3, "no weight 'model.layers.2.input_layernorm.weight'"),
                                           (1, "more layers than its config's 1, e.g. 'model.layers.1.")])
def test_hf_config_layer_count_disagrees_with_tensors(capsys, hf_copy, tmp_path, layers, expect):  # noqa: F811
    src = hf_copy()
    edit_config(src, num_hidden_layers=layers)
    run_failing(capsys, src, tmp_path / "out", expect=expect)


@pytest.mark.parametrize("value,count", [(float("nan"), "1 NaN and 0 infinite values"),
                                         (float("-inf"), "0 NaN and 1 infinite values")])
def test_non_finite_source_weight_is_refused(capsys, hf_dirs, tmp_path, value, count):  # noqa: F811
    def poison(sd):
        w = sd[WEIGHT].clone()
        w[3, 5] = value
        sd[WEIGHT] = w
    src = single_file_source(hf_dirs, tmp_path, poison)
    err = run_failing(capsys, src, tmp_path / "out", "--dtype", "float32", expect=f"weight {WEIGHT!r} of HF checkpoint")
    assert f"holds {count}; the source is damaged" in err


def test_float16_overflow_is_refused(capsys, hf_dirs, tmp_path):  # noqa: F811
    def scale(sd):
        sd[WEIGHT] = sd[WEIGHT] * 1e5  # finite in float32, beyond float16's 65504
    src = single_file_source(hf_dirs, tmp_path, scale)
    run_failing(capsys, src, tmp_path / "out", "--dtype", "float16",
                expect="does not fit float16: casting it gives 0 NaN and")
    assert main([str(src), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0


# ---------------------------------------------------------------------------------------------------------
# A converted checkpoint damaged afterwards: pyrajax.load refuses with a ValueError naming what is wrong.

@pytest.fixture
def converted(hf_dirs, tmp_path):  # noqa: F811
    assert main([str(hf_dirs["st-untied"][0]), str(tmp_path / "ck"), "--dtype", "float32"]) == 0
    return tmp_path / "ck"


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def test_load_config_shapes_disagree_with_tensors(converted):
    _edit_json(converted / "config.json", lambda c: c.update(ffn_dim=256))
    with pytest.raises(ValueError, match=r"weight layers\.0\.w_gate has shape \(64, 192\) but the config needs "
                                         r"\(64, 256\)"):
        pyrajax.load(converted)
    _edit_json(converted / "config.json", lambda c: c.update(ffn_dim=192, vocab_size="96"))
    with pytest.raises(ValueError, match="not a valid pyrajax config.*ModelConfig.vocab_size must be an int"):
        pyrajax.load(converted)


def test_load_orbax_directory_missing_one_array(converted):
    meta = converted / "params" / "_METADATA"
    saved = meta.read_text()
    _edit_json(meta, lambda m: m["tree_metadata"].pop("('layers', '1', 'wq')"))
    with pytest.raises(ValueError, match=r"missing weight layers\.1\.wq"):
        pyrajax.load(converted)
    meta.write_text(saved)
    data = max((p for p in (converted / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)  # the file holding the largest arrays
    data.unlink()
    with pytest.raises(ValueError, match="cannot read the weights in .*incomplete or damaged, re-convert"):
        pyrajax.load(converted)


def test_load_refuses_non_finite_weights(converted, tmp_path):
    from pyrajax.params import save_checkpoint
    params, cfg = pyrajax.load(converted, dtype="float32")
    layer = params.layers[1].replace(wo=params.layers[1].wo.at[0, 0].set(jnp.inf))
    save_checkpoint(params.replace(layers=(params.layers[0], layer)), cfg, tmp_path / "bad")
    with pytest.raises(ValueError, match=r"weight layers\.1\.wo in .* holds 0 NaN and 1 infinite values"):
        pyrajax.load(tmp_path / "bad")


@pytest.mark.parametrize("dtype", ["int8", "float64", "fp16", None, jnp.int32])
def test_load_dtype_by_name(converted, dtype):
    with pytest.raises(ValueError, match="unknown dtype .*use one of bfloat16, float16, float32"):
        pyrajax.load(converted, dtype=dtype)
    params, _ = pyrajax.load(converted, dtype="bfloat16")
    assert params.embed.dtype == jnp.bfloat16
    assert np.asarray(pyrajax.load(converted, dtype=jnp.float16)[0].final_norm).dtype == np.float16

