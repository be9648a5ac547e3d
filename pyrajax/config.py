"""Model configuration: a frozen dataclass, hashable so it can be a static jit argument."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pyrajax import validate


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_positions: int = 4096
    tie_embeddings: bool = False
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)
    pad_id: int = 0
    # Set by `pyrajax.load` when the checkpoint carries a tokenizer; not part of the model's maths.
    tokenizer_dir: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "dim", "ffn_dim", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_positions"):
            object.__setattr__(self, name, validate.integer(getattr(self, name), f"ModelConfig.{name}", 1))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        for name in ("rope_theta", "norm_eps"):
            if validate.real(getattr(self, name), f"ModelConfig.{name}") <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        # The special ids are the checkpoint's own metadata: ints, but not range-checked (a pad id of -1 only
        # fills padding slots; an EOS id outside the vocabulary is never generated).
        if self.bos_id is not None:
            object.__setattr__(self, "bos_id", validate.integer(self.bos_id, "ModelConfig.bos_id"))
        object.__setattr__(self, "pad_id", validate.integer(self.pad_id, "ModelConfig.pad_id"))
        if not isinstance(self.eos_ids, (list, tuple)):
            raise ValueError(f"ModelConfig.eos_ids must be a tuple of ints, got {validate.describe(self.eos_ids)}")
        object.__setattr__(self, "eos_ids", tuple(validate.integer(e, f"ModelConfig.eos_ids[{j}]")
                                                  for j, e in enumerate(self.eos_ids)))

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token_layer(self, itemsize: int) -> int:
        """Bytes of K and V one token occupies in one layer's cache."""
        return 2 * self.num_kv_heads * self.head_dim * itemsize

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("tokenizer_dir")  # where the tokenizer lives is a property of the checkpoint directory
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        d = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}; known: {sorted(known)}")
        if "eos_ids" in d:
            d["eos_ids"] = tuple(d["eos_ids"])
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_json(Path(path).read_text())


def _llama2(dim, layers, heads, kv_heads, ffn):
    return ModelConfig(vocab_size=32000, dim=dim, ffn_dim=ffn, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=dim // heads, rope_theta=10000.0, norm_eps=1e-5,
                       max_positions=4096, tie_embeddings=False, bos_id=1, eos_ids=(2,), pad_id=0)


PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": _llama2(4096, 32, 32, 32, 11008),
    "llama2-13b": _llama2(5120, 40, 40, 40, 13824),
    "llama2-70b": _llama2(8192, 80, 64, 8, 28672),
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, ffn_dim=1536, num_layers=30, num_heads=9,
                                num_kv_heads=3, head_dim=64, rope_theta=100000.0, norm_eps=1e-5,
                                max_positions=8192, tie_embeddings=True, bos_id=1, eos_ids=(2,),
                                pad_id=2),
    "tiny": ModelConfig(vocab_size=256, dim=64, ffn_dim=160, num_layers=4, num_heads=4, num_kv_heads=2,
                        head_dim=16, rope_theta=10000.0, norm_eps=1e-5, max_positions=1024,
                        tie_embeddings=False, bos_id=1, eos_ids=(2,), pad_id=0),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
