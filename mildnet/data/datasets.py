"""Decoded-image cache, the triplet dataset and batch embedding.

JPEG decoding dominates a CPU epoch, so every image is decoded once (by :func:`mildnet.imageio.decode_image`,
resized by the model's spec) into a ``uint8 Tensor[N, 3, S, S]`` kept in memory and on disk in the run folder.
Unreadable images are reported and left out, never fatal.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..checkpoint import atomic_torch_save
from ..errors import UsageError
from ..imageio import ImageDecodeError, decode_resized, normalize, resize_key
from ..spec import PreprocessSpec
from .catalogue import CatalogueError
from .transforms import PaperAugment

__all__ = ["ImageCache", "TripletDataset", "embed_images", "embed_items", "stack_triplets"]


class ImageCache:
    """``uint8 Tensor[N, 3, S, S]`` of decoded, resized images with a path -> row index.

    Built with :meth:`build`; saved (atomically) to ``cache_path``, where each image is reused while its file
    size and modification time and the spec's geometry are unchanged (several runs can share one file).
    """

    def __init__(self, paths: list[Path], images: torch.Tensor, bad: list[str]):
        self.paths, self.images, self.bad = paths, images, bad
        self.index = {p: i for i, p in enumerate(paths)}

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path) -> bool:
        return Path(path) in self.index

    def rows(self, paths: Sequence[os.PathLike]) -> list[int]:
        return [self.index[Path(p)] for p in paths]

    @staticmethod
    def spec_key(spec: PreprocessSpec) -> str:
        """What a cached image depends on: the spec's geometry (models with equal keys can share one cache)."""
        return resize_key(spec)

    @staticmethod
    def _stamp(p: Path) -> str:
        try:
            st = p.stat()
            return f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            return "missing"

    @classmethod
    def build(cls, paths: Sequence[os.PathLike], spec: PreprocessSpec, cache_path: str | os.PathLike | None = None,
              *, progress: bool = True) -> "ImageCache":
        """Decode ``paths`` (unique, order kept). With ``cache_path``, images already in that file (same
        geometry, same file size and mtime) are reused, only the others decoded, and the union saved back."""
        from tqdm import tqdm

        paths = list(dict.fromkeys(Path(p) for p in paths))
        stored: dict[str, tuple[str, torch.Tensor]] = {}
        stored_bad: dict[str, str] = {}
        blob = None
        if cache_path is not None and Path(cache_path).is_file():
            try:
                blob = torch.load(cache_path, map_location="cpu", weights_only=True)
            except Exception:  # a damaged cache is rebuilt, never trusted
                blob = None
        if blob and blob.get("spec") == cls.spec_key(spec):
            stored = {p: (st, blob["images"][i]) for i, (p, st) in enumerate(zip(blob["paths"], blob["stamps"]))}
            stored_bad = dict(blob.get("bad", {}))
        s = spec.input_size
        images = torch.empty((len(paths), 3, s, s), dtype=torch.uint8)
        good: list[Path] = []
        bad: list[str] = []
        todo = []
        for p in paths:
            stamp = cls._stamp(p)
            hit = stored.get(str(p))
            if hit is not None and hit[0] == stamp:
                images[len(good)] = hit[1]
                good.append(p)
            elif str(p) in stored_bad and stored_bad[str(p)].startswith(stamp + "|"):
                bad.append(stored_bad[str(p)].split("|", 1)[1])
            else:
                todo.append(p)
        new_bad: dict[str, str] = {}
        for p in tqdm(todo, desc=f"decoding images ({s}px)", disable=not progress or not todo, leave=False):
            try:
                images[len(good)] = decode_resized(p, spec)
                good.append(p)
            except ImageDecodeError as e:
                bad.append(str(e))
                new_bad[str(p)] = f"{cls._stamp(p)}|{e}"
        for msg in bad:
            warnings.warn(f"skipping unreadable image: {msg}", stacklevel=2)
        cache = cls(good, images[:len(good)].clone(), bad)
        if cache_path is not None and (todo or blob is None):
            merged = {p: st_img for p, st_img in stored.items()}
            for i, p in enumerate(good):
                merged[str(p)] = (cls._stamp(p), cache.images[i])
            keys = list(merged)
            atomic_torch_save({"spec": cls.spec_key(spec), "paths": keys, "stamps": [merged[k][0] for k in keys],
                               "images": torch.stack([merged[k][1] for k in keys]) if keys
                               else torch.empty((0, 3, s, s), dtype=torch.uint8),
                               "bad": {**stored_bad, **new_bad}}, cache_path)
        return cache


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(np.asarray(parts, np.int64).tobytes(), digest_size=8).digest(),
                          "little") >> 1


class TripletDataset(Dataset):
    """Triplets of cached images: item ``i`` is ``uint8 Tensor[3, 3, S, S]`` (query, positive, negative), or
    ``Tensor[3, F]`` rows of ``table`` (features of the cache's images, e.g. pooled taps; not augmented).

    With ``augment``, each image gets its own random draw from a generator seeded by (seed, epoch, i): the
    result depends on nothing else (not on worker count, process, or what ran before), which makes an
    interrupted-and-resumed run identical to an uninterrupted one. Call :meth:`set_epoch` every epoch.
    """

    def __init__(self, cache: ImageCache, triplets: Sequence[tuple[os.PathLike, os.PathLike, os.PathLike]],
                 augment: PaperAugment | None = None, seed: int = 0, table: torch.Tensor | None = None):
        self.cache, self.augment, self.seed, self.epoch = cache, augment, seed, 0
        self.table = cache.images if table is None else table  # or per-image features aligned with the cache
        if table is not None and augment is not None:
            raise UsageError("a feature table cannot be augmented: augmentations act on images")
        rows = []
        self.skipped = 0
        for t in triplets:
            if all(Path(x) in cache.index for x in t):
                rows.append(cache.rows(t))
            else:
                self.skipped += 1  # a triplet touching an unreadable image
        if not rows:
            raise CatalogueError("no usable triplets (all of them refer to missing or unreadable images)")
        self.rows = torch.tensor(rows, dtype=torch.long)  # (T, 3)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        imgs = self.table[self.rows[i]]  # (3, 3, S, S) uint8, or (3, F) rows of a feature table
        if self.augment is None:
            return imgs
        g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, i))
        return torch.stack([self.augment(img, g) for img in imgs])


def stack_triplets(batch: torch.Tensor) -> torch.Tensor:
    """``Tensor[T, 3, C, S, S]`` (per-triplet q, p, n) -> ``Tensor[3T, C, S, S]`` laid out [q; p; n]."""
    return batch.transpose(0, 1).reshape(-1, *batch.shape[2:])


@torch.no_grad()
def embed_images(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 64,
                 device: str | torch.device = "cpu", progress: bool = False, forward=None,
                 desc: str = "embedding") -> np.ndarray:
    """``uint8 Tensor[N, 3, S, S]`` -> ``float32 ndarray[N, D]`` with ``model`` in eval mode.

    ``forward`` (default ``model``) is applied to each normalised batch: ``model.pool`` gives the pooled taps.
    """
    from tqdm import tqdm

    forward = forward or model
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
            x = normalize(images[start:start + batch_size].to(device), model.spec)
            out.append(forward(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, model.embedding_dim), np.float32)


def embed_items(model: torch.nn.Module, items, *, batch_size: int = 64, device: str | torch.device = "cpu",
                cache_path: str | os.PathLike | None = None, progress: bool = True, forward=None,
                desc: str = "embedding") -> np.ndarray:
    """Embed catalogue items (or paths) with ``model`` (or ``forward``, e.g. ``model.pool``, as
    :func:`embed_images`): ``float32 ndarray[len(items), D]``; unreadable images get a row of NaN (and a
    warning) so rows stay aligned with ``items``."""
    paths = [Path(getattr(it, "path", it)) for it in items]
    cache = ImageCache.build(paths, model.spec, cache_path, progress=progress)
    emb = embed_images(model, cache.images, batch_size=batch_size, device=device, progress=progress,
                       forward=forward, desc=desc)
    out = np.full((len(paths), emb.shape[1]), np.nan, dtype=np.float32)
    for i, p in enumerate(paths):
        if p in cache.index:
            out[i] = emb[cache.index[p]]
    return out
