"""A checkpoint folder of safetensors shards, read one tensor at a time.

The shard of each tensor comes from ``model.safetensors.index.json`` when there is one,
else from the shards' own headers. Only headers are read up front (names, shapes, dtypes);
:meth:`Checkpoint.read` then memory-maps the tensor's shard, copies that one tensor out and
closes the file, so the pages of a shard do not stay mapped (and counted in the resident
set) while the rest of the model is read.

Example::

    >>> ckpt = Checkpoint("llama-folder")
    >>> ckpt.keys()[:2]
    ['lm_head.weight', 'model.embed_tokens.weight']
    >>> ckpt.shape("lm_head.weight"), ckpt.dtype("lm_head.weight")
    ((32000, 4096), torch.bfloat16)
    >>> w = ckpt.read("lm_head.weight")          # this tensor only
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of ``folder``'s ``*.safetensors`` shards: names, shapes and dtypes, and one tensor at a time."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a folder")
        index = self.folder / INDEX
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.folder} holds no *.safetensors shard: a checkpoint is pruned from its "
                                    "safetensors files (save the model with save_pretrained, which writes them)")
        missing = [f for f in files if not (self.folder / f).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in the folder: {missing[:3]}")
        self.files = files
        self._where: dict[str, str] = {}  # tensor name -> shard file, in shard order
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name in files:
            with safe_open(self.folder / name, framework="pt") as handle:
                for key in handle.keys():
                    if key in self._where:
                        raise ValueError(f"tensor {key!r} is in two shards: {self._where[key]} and {name}")
                    self._where[key] = name
                    part = handle.get_slice(key)
                    shape = tuple(part.get_shape())
                    # an empty slice has the dtype without reading the data (a 0-d tensor is read: it is tiny)
                    dtype = (part[:0] if shape else handle.get_tensor(key)).dtype
                    self._specs[key] = (shape, dtype)

    def keys(self) -> list[str]:
        """Every tensor name, shard by shard (the order in which reading them walks each file once)."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._specs[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._specs[name][1]

    def shard_bytes(self) -> int:
        """The size of the largest shard file, in bytes."""
        return max((self.folder / f).stat().st_size for f in self.files)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, copied out of its memory-mapped shard (which is closed again)."""
        with safe_open(self.folder / self._where[name], framework="pt") as handle:
            return handle.get_tensor(name)
