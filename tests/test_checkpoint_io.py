"""save_checkpoint's overwrite guarantees: dst always holds a complete (old or new) checkpoint, no temporary
directories are left behind, and the directory gets ordinary umask permissions."""
from __future__ import annotations

import errno
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pyrajax
from pyrajax import params as pp


@pytest.fixture(scope="module")
def tiny():
    cfg = pyrajax.preset("tiny")
    return cfg, pp.random_params(jax.random.key(0), cfg), pp.random_params(jax.random.key(1), cfg)


def embed_of(path):
    return np.asarray(pp.load_checkpoint(path, dtype=jnp.float32)[0].embed)


def leftovers(root):
    return [p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def no_exchange(a, b):
    return False  # as on a kernel / filesystem without renameat2(RENAME_EXCHANGE): two-rename fallback


def failing_exchange(a, b):
    raise OSError(errno.EBUSY, "simulated failure of the atomic swap")


@pytest.mark.parametrize("how", ["exchange", "fallback-second-rename"])
def test_overwrite_failing_swap_keeps_old_checkpoint(tiny, tmp_path, monkeypatch, how):
    cfg, old, new = tiny
    dst = tmp_path / "model"
    pp.save_checkpoint(old, cfg, dst)
    if how == "exchange":
        monkeypatch.setattr(pp, "_exchange", failing_exchange, raising=False)
    else:
        monkeypatch.setattr(pp, "_exchange", no_exchange, raising=False)
        real = os.rename

        def flaky(a, b):  # the tmp -> dst rename fails, after dst was moved aside
            if os.path.basename(str(a)).startswith(".model.tmp-"):
                raise OSError(errno.EBUSY, "simulated failure of the tmp -> dst rename")
            return real(a, b)
        monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="simulated"):
        pp.save_checkpoint(new, cfg, dst, force=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(embed_of(dst), np.asarray(old.embed))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_fresh_checkpoint_mode_follows_umask(tiny, tmp_path, umask):
    cfg, old, _ = tiny
    prev = os.umask(umask)
    try:
        dst = pp.save_checkpoint(old, cfg, tmp_path / "model")
    finally:
        os.umask(prev)
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_overwrite_replaces_content(tiny, tmp_path, monkeypatch, exchange):
    cfg, old, new = tiny
    if not exchange:
        monkeypatch.setattr(pp, "_exchange", no_exchange, raising=False)
    dst = tmp_path / "model"
    pp.save_checkpoint(old, cfg, dst)
    (dst / "marker").write_text("from the old checkpoint")
    pp.save_checkpoint(new, cfg, dst, force=True)
    assert not (dst / "marker").exists()
    np.testing.assert_array_equal(embed_of(dst), np.asarray(new.embed))
    assert leftovers(tmp_path) == []
