"""``mildnet train --catalogue``: the default recipe, metric learning that generalises to products training
never saw (see docs/results.md "Accuracy on real data" for what was tried and measured).

The MILDNet structure stays (taps of several layers pooled and concatenated, a dense head, L2), with one
change of ours: the head is residual (:class:`mildnet.models.head.ResidualHead`): the embedding starts as the
ImageNet backbone's and the head learns a correction, so products unlike the training ones keep what the backbone
tells apart. What else changes is how the head learns:

* batches of P products x K images (:class:`mildnet.data.samplers.PKSampler`), every other image of the
  batch a positive or a negative, photo-photo as well as photo-catalogue positives;
* a metric-learning loss over the whole batch (proxy-anchor by default; multi-similarity and normalised
  softmax as options; the default is what bench/accuracy.py's study chose on the dev split) instead of one
  fixed negative per triplet, plus ``preserve`` times :func:`mildnet.losses.similarity_preservation`: the
  cosines between images of different products are held near the zero-shot backbone's, the geometry that tells
  apart products training never saw;
* model selection on a dev split carved from the catalogue itself (:func:`mildnet.data.splits.protocol_split`
  with no test products): products training never reads (``dev_unseen``) and held-out photos of the products
  it does read (``dev_seen``). The checkpoint kept is the epoch with the best :func:`selection_score`.

The backbone is frozen, so each image's pooled taps are computed once, and ``catalogue_views`` augmented copies
of each training catalogue image (one clean shot per product is all the catalogue side has to learn from) and
``photo_views`` of each photo; the head trains on them: minutes on a CPU. ``centre`` subtracts the training
images' mean embedding from the kept head (folded into its last bias, :func:`mildnet.models.head.centre_head`).
The run folder holds ``best.pt`` (a mildnet checkpoint), ``metrics.json`` and ``curves.png`` (dev metrics per
epoch), and the decoded-image cache ``images_<size>.pt`` (reused by a rerun on the same images).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .checkpoint import save_checkpoint
from .data.catalogue import CatalogueItem
from .data.datasets import ImageCache, _seed, embed_items
from .data.samplers import PKSampler
from .data.splits import ProtocolSplit
from .data.transforms import RetrievalAugment
from .errors import UsageError
from .fileio import atomic_open, atomic_write_text
from .imageio import normalize
from .losses import BATCH_LOSSES, NormSoftmax, ProxyAnchor, multi_similarity, similarity_preservation
from .metrics import split_report, summarise
from .models import create
from .models.head import centre_head, output_layer

__all__ = ["MetricConfig", "selection_score", "pool_items", "pool_views", "embed_pooled_rows", "train_metric",
           "SELECTION_METRICS"]

# What a kept checkpoint is chosen on: retrieval of products never trained on, among photos and against the
# catalogue, and catalogue retrieval of trained products from photos never trained on (all on dev photos).
SELECTION_METRICS = (("dev_unseen", "photo_to_photo_mAP"), ("dev_unseen", "photo_to_catalogue_recall@5"),
                     ("dev_seen", "photo_to_catalogue_recall@1"))


@dataclass
class MetricConfig:
    """The recipe's settings (saved in ``metrics.json`` and the checkpoint)."""

    out: str = "runs/mildnet"
    model: str = "mildnet_effnet_lite0"
    input_size: int | None = None
    loss: str = "proxy_anchor"  # chosen on the dev split (bench/accuracy.py's study; README)
    temperature: float = 0.05  # norm_softmax
    lr: float = 3e-5  # with the residual head: chosen on the dev split and the kind dev (bench/accuracy.py)
    weight_decay: float = 1e-4
    epochs: int = 20  # chosen on the dev split with the residual head (bench/accuracy.py study)
    P: int = 16  # products per batch
    K: int = 4  # images per product
    catalogue_share: float = 0.5  # chance each of a product's K slots (but the first) is its catalogue image
    sibling_batches: bool = False  # a batch takes whole categories (PKSampler groups; studied on the dev split)
    dropout: float = 0.5
    final_relu: bool = False  # see DenseHead: the paper's VGG head ends in a ReLU, its Mobile head does not
    residual: bool = True  # ResidualHead: start at the zero-shot embedding (chosen on the dev split; docs/results.md)
    centre: bool = True  # subtract the training images' mean embedding (folded into a bias; chosen on the dev split)
    catalogue_views: int = 8  # augmented copies of each training catalogue image, pooled once (0: none)
    photo_views: int = 0  # augmented copies of each training photo, pooled once (0: none; chosen on the dev split)
    preserve: float = 8.0  # weight of similarity_preservation (0: none; chosen on the dev split, over three seeds)
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss not in BATCH_LOSSES:
            raise UsageError(f"loss must be one of {BATCH_LOSSES}, got {self.loss!r}")
        for name in ("lr", "epochs", "P", "K"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("catalogue_views", "photo_views", "preserve"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.centre and self.final_relu and not self.residual:
            raise UsageError("centre needs a head that ends in a linear layer: set final_relu False or residual True")

    def recipe(self) -> dict:
        """The settings that decide what is trained (not where it goes, nor how it is shown or run)."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "progress", "threads")}


def selection_score(dev: dict[str, dict[str, dict[str, float]]]) -> float:
    """Mean of :data:`SELECTION_METRICS` from ``{role: summarise(...)}`` (NaN ones left out)."""
    vals = [dev.get(role, {}).get(name, {}).get("value", float("nan")) for role, name in SELECTION_METRICS]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def pool_items(model, items: Sequence[CatalogueItem], cache_path: str | Path | None = None, *,
               progress: bool = True, batch_size: int = 64) -> torch.Tensor:
    """Pooled taps of every item's image: ``Tensor[len(items), pooled_dim]`` (NaN rows: unreadable images)."""
    return torch.from_numpy(embed_items(model, items, batch_size=batch_size, cache_path=cache_path,
                                        progress=progress, forward=model.pool, desc="pooling taps"))


@torch.no_grad()
def pool_views(model, items: Sequence[CatalogueItem], indices: Sequence[int], views: int, *, seed: int = 0,
               progress: bool = True) -> torch.Tensor:
    """Pooled taps of ``views`` augmented copies (:class:`RetrievalAugment`) of each ``items[i]``:
    ``Tensor[views, len(indices), pooled_dim]``. Copy v of item i is a function of (seed, v, i) alone."""
    from tqdm import tqdm

    cache = ImageCache.build([items[i].path for i in indices], model.spec, progress=False)
    aug = RetrievalAugment()
    out = torch.empty((views, len(indices), model.pooled_dim))
    was = model.training
    model.eval()
    try:
        for v in tqdm(range(views), desc="pooling augmented copies", disable=not progress, leave=False):
            imgs = torch.stack([aug(cache.images[cache.index[items[i].path]],
                                    torch.Generator().manual_seed(_seed(seed, v, i))) for i in indices])
            for start in range(0, len(imgs), 64):
                out[v, start:start + 64] = model.pool(normalize(imgs[start:start + 64], model.spec)).float()
    finally:
        model.train(was)
    return out


def _loss_module(cfg: MetricConfig, n_classes: int, dim: int) -> torch.nn.Module | None:
    if cfg.loss == "norm_softmax":
        return NormSoftmax(n_classes, dim, cfg.temperature)
    if cfg.loss == "proxy_anchor":
        return ProxyAnchor(n_classes, dim)
    return None


@torch.no_grad()
def embed_pooled_rows(model, pooled: torch.Tensor) -> np.ndarray:
    """The model's embedding of pooled taps ``Tensor[N, pooled_dim]``, eval mode: ``ndarray[N, D]``; rows of
    NaN stay NaN (unreadable images)."""
    was = model.training
    model.eval()
    try:
        out = model.embed_pooled(torch.nan_to_num(pooled)).numpy()
    finally:
        model.train(was)
    out[~torch.isfinite(pooled).all(1).numpy()] = np.nan
    return out


def dev_metrics(model, pooled: torch.Tensor, items: Sequence[CatalogueItem], split: ProtocolSplit,
                *, n_boot: int = 200) -> dict:
    """``{role: summarise(split_report)}`` on the dev roles, from pooled taps."""
    emb = embed_pooled_rows(model, pooled)
    return {role: summarise(split_report(emb, items, split.roles[role], split.catalogue), n_boot=n_boot)
            for role in ("dev_unseen", "dev_seen") if split.roles.get(role)}


def train_metric(cfg: MetricConfig, items: Sequence[CatalogueItem], split: ProtocolSplit, *,
                 pooled: torch.Tensor | None = None, views: dict[int, torch.Tensor] | None = None,
                 model=None) -> dict:
    """Train the head of ``cfg.model`` on ``split.training_images()`` with the recipe of the module
    docstring; keep the epoch with the best dev :func:`selection_score`. ``pooled`` (``Tensor[len(items),
    pooled_dim]``) and ``views`` (item index -> ``Tensor[>= catalogue_views or photo_views, pooled_dim]``, from
    :func:`pool_views`) skip the pooling passes (several runs on one catalogue share them).
    Returns ``{"best", "history", "out", "seconds", "model"}``."""
    from tqdm import tqdm

    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if model is None:
        kw = {"input_size": cfg.input_size} if cfg.input_size else {}
        model = create(cfg.model, pretrained=True, dropout=cfg.dropout, final_relu=cfg.final_relu,
                       residual=cfg.residual, **kw)
    if getattr(model, "head", None) is None:
        raise UsageError(f"{cfg.model} has no dense head to train (a zero-shot baseline): evaluate it instead")
    units = model.backbone.units()
    model.freeze(list(dict.fromkeys([*model.frozen_modules(), *units])))  # frozen backbone: taps pooled once
    if pooled is None:  # only what training and selection read (a val photo is never pooled here)
        needed = sorted(set(split.training_images()) | set(split.catalogue)
                        | {i for r in ("dev_seen", "dev_unseen") for i in split.roles[r]})
        pooled = torch.full((len(items), model.pooled_dim), float("nan"))
        pooled[needed] = pool_items(model, [items[i] for i in needed], out / f"images_{model.spec.input_size}.pt",
                                    progress=cfg.progress)
    train_idx = [i for i in split.training_images() if torch.isfinite(pooled[i]).all()]
    products = sorted({items[i].item_id for i in train_idx})
    label_of = {p: k for k, p in enumerate(products)}
    labels = torch.tensor([label_of[items[i].item_id] for i in train_idx])
    # (V + 1, N, pooled_dim): view 0 is every image as it is; views 1..n of a row are augmented copies of it, pooled
    # once: n = catalogue_views for a catalogue image, photo_views for a photo (V = the larger; a row never draws
    # beyond its n)
    is_shop = torch.tensor([items[i].domain == "shop" for i in train_idx], dtype=torch.bool)
    n_views = torch.where(is_shop, cfg.catalogue_views, cfg.photo_views)  # (N,)
    table = pooled[train_idx].unsqueeze(0).repeat(int(n_views.max()) + 1, 1, 1)
    views = dict(views or {})
    for count, wanted in ((cfg.catalogue_views, is_shop), (cfg.photo_views, ~is_shop)):
        rows = wanted.nonzero().flatten().tolist()
        if not count or not rows:
            continue
        idx = [train_idx[r] for r in rows]
        todo = [i for i in idx if len(views.get(i, ())) < count]
        if todo:  # copy v of item i is a function of (seed, v, i): pooled here or by the caller, the same tensor
            views.update(zip(todo, pool_views(model, items, todo, count, seed=cfg.seed,
                                              progress=cfg.progress).unbind(1)))
        table[1:count + 1, rows] = torch.stack([views[i][:count] for i in idx], 1)
    sampler = PKSampler([items[i].item_id for i in train_idx], P=cfg.P, K=cfg.K, seed=cfg.seed,
                        is_catalogue=is_shop.tolist(), catalogue_share=cfg.catalogue_share,
                        groups=[items[i].category for i in train_idx] if cfg.sibling_batches else None)
    loss_mod = _loss_module(cfg, len(products), model.embedding_dim)
    groups = [{"params": list(model.trainable_parameters())}]
    if loss_mod is not None:  # proxies learn fast (the proxy-anchor paper's 100x)
        groups.append({"params": list(loss_mod.parameters()), "lr": cfg.lr * 100})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    history: list[dict] = []
    best: dict = {}
    best_state = None

    def record(epoch: int, loss: float, seconds: float) -> None:
        nonlocal best, best_state
        # what is scored and kept is the centred head (cfg.centre); training goes on from the uncentred one
        bias = output_layer(model.head).bias if cfg.centre else None
        trained_bias = bias.detach().clone() if cfg.centre else None
        if cfg.centre:
            centre_head(model.head, table[0])  # view 0: the training images as they are
        dev = dev_metrics(model, pooled, items, split)
        score = selection_score(dev)
        row = {"epoch": epoch, "train_loss": loss, "selection_score": score, "seconds": round(seconds, 2),
               **{f"{role}_{k}": v["value"] for role, d in dev.items() for k, v in d.items()}}
        history.append(row)
        # no dev photos at all (a tiny catalogue): NaN scores, and the last epoch is kept
        key = score if np.isfinite(score) else -np.inf
        if epoch > 0 and (not best or key > best["key"] or key == best["key"] == -np.inf):
            best = {"epoch": epoch, "selection_score": score, "key": key, "dev": dev}
            best_state = copy.deepcopy(model.state_dict())
        if cfg.centre:
            with torch.no_grad():
                bias.copy_(trained_bias)
        if cfg.progress:
            print(f"epoch {epoch}: loss {loss:.4f} | dev score {score:.4f}"
                  + (" *" if best.get("epoch") == epoch else ""), flush=True)

    record(0, float("nan"), 0.0)  # the untrained head, for reference (never kept: it is random)
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout draws: a function of (seed, epoch)
        sampler.set_epoch(epoch)
        view_rng = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        total = 0.0
        for batch in tqdm(sampler, desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress, leave=False):
            b = torch.tensor(batch)
            v = (torch.rand(len(b), generator=view_rng) * (n_views[b] + 1)).long()  # 0..n_views, uniform
            x = table[v, b]  # (P*K, pooled_dim)
            emb = model.embed_pooled(x)  # (P*K, D) unit
            loss = multi_similarity(emb, labels[b]) if loss_mod is None else loss_mod(emb, labels[b])
            if cfg.preserve:
                loss = loss + cfg.preserve * similarity_preservation(emb, model.zero_shot_embedding(x), labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        record(epoch, total / len(sampler), time.time() - t0)
    best.pop("key")
    model.load_state_dict(best_state)
    model.eval()
    save_checkpoint(out / "best.pt", model, variant=model.variant, model_kwargs=model.model_kwargs,
                    extra={"epoch": best["epoch"], "selection_score": best["selection_score"],
                           "training": json.dumps({"recipe": "metric", **asdict(cfg)})})
    seconds = round(time.time() - t_start, 1)
    atomic_write_text(out / "metrics.json", json.dumps(
        {"config": asdict(cfg), "selection": [f"{r}:{m}" for r, m in SELECTION_METRICS],
         "split": split.summary(items), "history": history, "best": best, "seconds": seconds}, indent=2,
        default=float))
    _plot(out / "curves.png", history)
    return {"best": best, "history": history, "out": str(out), "seconds": seconds, "model": model}


def _plot(path: Path, history: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ep = [h["epoch"] for h in history[1:]]
    ax1.plot(ep, [h["train_loss"] for h in history[1:]], marker="o")
    ax1.set_title("training loss")
    for key in sorted(k for k in history[0] if k.startswith("dev_") and ("mAP" in k or "recall@" in k)):
        ax2.plot([h["epoch"] for h in history], [h[key] for h in history], marker=".", label=key[4:])
    ax2.set_title("dev metrics (selection)")
    ax2.legend(fontsize=6)
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
