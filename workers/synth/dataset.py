"""A torch `Dataset` over the shards of a stored dataset (the only module of the fabric that imports torch).

Shards are memory-mapped (uncompressed .npz members and safetensors tensors both map directly),
and each shard is re-hashed against its manifest the first time it is opened, so a truncated or
altered file fails loudly with `CorruptArtifactError` instead of feeding garbage to training.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from schema.artifact_store import ArtifactStore
from schema.artifacts import CorruptArtifactError, Manifest
from workers.synth.base import Arrays, ShardFormatError, read_shard


class ShardDataset(Dataset[dict[str, Any]]):
    """Examples of a dataset as dicts of tensors (string fields stay `str`).

    `fields` selects arrays (default: all); `transform` is applied to each example dict.
    """

    def __init__(
        self,
        manifest: Manifest | str,
        store: ArtifactStore,
        fields: Sequence[str] | None = None,
        verify: bool = True,
        mmap: bool = True,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.manifest = manifest if isinstance(manifest, Manifest) else store.load_manifest(manifest)
        unknown = set(fields or ()) - set(self.manifest.label_schema)
        if unknown:
            raise KeyError(f"dataset has no field(s) {sorted(unknown)}; it has {sorted(self.manifest.label_schema)}")
        self.fields = list(fields) if fields else list(self.manifest.label_schema)
        self.verify = verify
        self.mmap = mmap
        self.transform = transform
        self._starts: list[int] = []
        total = 0
        for shard in self.manifest.shards:
            self._starts.append(total)
            total += shard.count
        self._len = total
        self._open: dict[int, Arrays] = {}

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open their own maps instead of receiving pickled copies of the data.
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def __len__(self) -> int:
        return self._len

    def shard_arrays(self, index: int) -> Arrays:
        """The (verified, memory-mapped) arrays of shard `index`."""
        if index not in self._open:
            shard = self.manifest.shards[index]
            if self.verify:
                self.store.check(shard.id, shard.size)
            try:
                arrays = read_shard(self.store.path(shard.id), shard.format, mmap=self.mmap)
            except ShardFormatError as exc:
                raise CorruptArtifactError(f"shard {index} ({shard.id}) cannot be read: {exc}") from None
            for name in self.fields:
                if name not in arrays or len(arrays[name]) != shard.count:
                    raise CorruptArtifactError(f"shard {index} ({shard.id}) lacks {shard.count} rows of {name!r}")
            self._open[index] = arrays
        return self._open[index]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for a dataset of {self._len}")
        shard = bisect.bisect_right(self._starts, i) - 1
        arrays = self.shard_arrays(shard)
        j = i - self._starts[shard]
        item: dict[str, Any] = {}
        for name in self.fields:
            value = arrays[name][j]
            if isinstance(value, np.ndarray) and value.dtype.kind != "U":
                item[name] = torch.from_numpy(np.array(value))  # copy: maps are read-only
            elif isinstance(value, np.str_ | str):
                item[name] = str(value)
            else:
                item[name] = torch.tensor(value.item() if isinstance(value, np.generic) else value)
        return self.transform(item) if self.transform else item


def load_tensors(
    manifest: Manifest | str, store: ArtifactStore, fields: Sequence[str] | None = None
) -> dict[str, torch.Tensor | list[str]]:
    """A whole (small) dataset in memory: numeric fields as tensors, string fields as lists."""
    ds = ShardDataset(manifest, store, fields)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ds.fields}
    for index in range(len(ds.manifest.shards)):
        arrays = ds.shard_arrays(index)
        for name in ds.fields:
            parts[name].append(np.asarray(arrays[name]))
    out: dict[str, torch.Tensor | list[str]] = {}
    for name, chunks in parts.items():
        joined = np.concatenate(chunks) if chunks else np.zeros((0,))
        out[name] = [str(v) for v in joined] if joined.dtype.kind == "U" else torch.from_numpy(joined.copy())
    return out
