"""Write a state dict that is never whole in memory: shard by shard, each tensor made when its shard is written.

huggingface_hub's :func:`split_torch_state_dict_into_shards` plans the shards from meta tensors
(shapes and dtypes only: it reads no data), then each shard's tensors are produced one after the
other, saved with :func:`safetensors.torch.save_file` and dropped before the next shard. Peak memory
is one shard plus whatever ``produce`` holds while making one tensor. The index is written as
huggingface_hub's own documentation of that function does (it has no helper that writes it alone).

Example::

    >>> specs = {"a": ((4, 3), torch.float32), "b": ((2,), torch.float32)}
    >>> write_shards("out", specs, lambda name: torch.zeros(specs[name][0]), max_shard_size=40)
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fxprune.io.checkpoint.shards import INDEX


def write_shards(folder, specs: dict, produce, max_shard_size="5GB", progress=None) -> list[str]:
    """Write ``{name: produce(name)}`` into safetensors shards (plus the index when there are several).

    ``specs`` is ``{name: (shape, dtype)}`` in the order to write; ``produce(name)`` must return a tensor
    of that shape and dtype. Returns the shard file names. ``progress``: ``True``/``False`` forces the
    tqdm bar over tensors on or off; ``None`` shows it on a terminal.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    planned = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in specs.items()}
    split = split_torch_state_dict_into_shards(planned, max_shard_size=max_shard_size)
    with tqdm(total=len(specs), desc="fxprune writing shards", disable=None if progress is None else not progress) \
            as bar:
        for filename, names in split.filename_to_tensors.items():
            shard = {}
            for name in names:
                tensor = produce(name)
                shape, dtype = specs[name]
                if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise ValueError(f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, planned {tuple(shape)} "
                                     f"{dtype}")
                shard[name] = tensor.contiguous()
                bar.update()
            save_file(shard, folder / filename, metadata={"format": "pt"})
            del shard  # before the next shard's tensors are made
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)
