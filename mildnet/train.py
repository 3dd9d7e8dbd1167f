"""``mildnet train``: triplet training as in the paper, resumable, single- or multi-process (torchrun).

Recipe (shared/reference/MILDNET.md): a batch of T triplets is 3T images in ONE forward (laid out
[queries; positives; negatives]); Euclidean distance on unit embeddings, margin 1; per-triplet hinge
(default), the official batch-mean hinge or contrastive; SGD with Nesterov momentum 0.9 at lr 1e-3
(1e-4 for mildnet_512), no weight decay, no schedule; AdamW as an option; the paper's augmentations on
training images only; the layers the model freezes stay frozen (``model.trainable_parameters()``); the
checkpoint with the best validation loss is kept.

Run folder (``--out``): ``best.pt`` (a mildnet checkpoint, ``weights_only``-loadable), ``last.pt`` (model +
optimiser + epoch + step + RNG, written atomically after every epoch; ``--resume`` continues from it),
``metrics.csv``, ``metrics.json``, ``curves.png`` and the decoded-image cache.

Exact resume: everything random is a function of (seed, epoch): the data order (``DistributedSampler`` with
``set_epoch``), each image's augmentation (seeded by (seed, epoch, index)) and dropout (the global generator
is re-seeded at each epoch start). A run stopped at any point and resumed gives the same weights as one
that never stopped.

Multi-GPU / multi-node: ``torchrun --nproc_per_node N -m mildnet train ...`` runs DistributedDataParallel
(NCCL on GPUs, gloo on CPU); each process takes ``--batch-size`` triplets per step; only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import CheckpointError, atomic_torch_save, save_checkpoint
from .data.datasets import ImageCache, TripletDataset, _seed, embed_images, stack_triplets
from .data.transforms import PaperAugment
from .imageio import normalize
from .data.triplets import read_triplets
from .fileio import atomic_open, atomic_write_text
from .losses import BATCH_LOSSES, LOSSES, distance, get_loss, split_triplets, triplet_correct
from .models.head import MILDNet

__all__ = ["TrainConfig", "train", "triplet_metrics", "configure_parser", "run"]


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in ``last.pt`` and ``metrics.json``)."""

    train: str
    val: str | None = None
    out: str = "runs/mildnet"
    model: str = "mildnet_mobile"
    pretrained: bool = False
    input_size: int | None = None
    image_root: str | None = None
    allow_outside_root: bool = False
    loss: str = "hinge"
    margin: float = 1.0
    optimizer: str = "sgd"
    lr: float | None = None  # None: the paper's rate for the model
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 20
    batch_size: int = 16
    workers: int = 0
    seed: int = 0
    augment: bool = True
    max_train_triplets: int | None = None
    max_val_triplets: int | None = None
    max_steps: int | None = None  # stop after this many optimiser steps in all (a budget; resumable)
    select: str = "loss"  # best checkpoint by lowest val "loss" or highest val "accuracy"
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA only
    cache: str | None = None  # decoded-image cache file (default: in the run folder)
    threads: int | None = None
    progress: bool = True
    freeze_units: int | None = None  # freeze the first N backbone units (beyond what the model freezes)
    freeze_backbone: bool = False  # freeze every backbone unit: only the dense head trains
    pool_once: bool = True  # head-only training without augmentation: pool each image's taps once (see _pools_once)
    freeze_bn: bool = False  # keep every BatchNorm on its pretrained statistics (small triplet batches)
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.model == "mildnet_512" else 1e-3


# --------------------------------------------------------------------------------------------- metrics
def triplet_metrics(embeddings: np.ndarray | torch.Tensor, rows: torch.Tensor, loss_name: str = "hinge",
                    margin: float = 1.0, kinds: list[str] | None = None) -> dict[str, float]:
    """Loss and triplet accuracy of triplets given as rows ``Tensor[T, 3]`` into ``embeddings[N, D]``;
    with ``kinds``, the accuracy per kind too (``accuracy_in_class`` ...)."""
    emb = torch.as_tensor(embeddings, dtype=torch.float32)
    q, p, n = emb[rows[:, 0]], emb[rows[:, 1]], emb[rows[:, 2]]
    correct = triplet_correct(q, p, n)
    out = {"loss": float(get_loss(loss_name)(q, p, n, margin=margin)), "accuracy": float(correct.float().mean()),
           "triplets": int(len(rows)),
           "mean_d_pos": float(distance(q, p).mean()), "mean_d_neg": float(distance(q, n).mean())}
    if kinds is not None:
        k = np.asarray(kinds)
        c = correct.numpy()
        for kind in sorted(set(kinds)):
            out[f"accuracy_{kind}"] = float(c[k == kind].mean())
    return out


# --------------------------------------------------------------------------------------------- helpers
def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA GPU is available")
    return dev


def _subset(rows: list, kinds: list | None, limit: int | None, seed: int):
    """A deterministic random subset of ``limit`` triplets (order kept), or all."""
    if limit is None or limit >= len(rows):
        return rows, kinds
    keep = np.sort(np.random.default_rng([seed, 7]).choice(len(rows), limit, replace=False))
    return [rows[i] for i in keep], ([kinds[i] for i in keep] if kinds is not None else None)


def _write_logs(out: Path, cfg: TrainConfig, history: list[dict], best: dict) -> None:
    keys = list(dict.fromkeys(k for h in history for k in h))
    with atomic_open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    atomic_write_text(out / "metrics.json", json.dumps({"config": asdict(cfg), "history": history, "best": best},
                                                       indent=2))
    _plot(out / "curves.png", history)


def _plot(path: Path, history: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax1), ("accuracy", ax2)):
        for split in ("train", "val"):
            pts = [(h["epoch"], h[f"{split}_{key}"]) for h in history
                   if h.get(f"{split}_{key}") is not None and not (isinstance(h[f"{split}_{key}"], float)
                                                                  and math.isnan(h[f"{split}_{key}"]))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_title(f"triplet {key}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _pools_once(model: torch.nn.Module) -> bool:
    """True when only a MILDNet's dense head trains: then each image's pooled taps never change (the frozen
    backbone, BatchNorms included, is deterministic), so they are computed once instead of every epoch; the
    head sees the same inputs and dropout draws, so training is the same, only many times faster."""
    if not isinstance(model, MILDNet) or model.head is None:
        return False
    in_head = {id(p) for p in model.head.parameters()}
    return all(id(p) in in_head for p in model.trainable_parameters())


class _PooledHead(torch.nn.Module):
    """A MILDNet above its pooled taps, as a module (what DDP wraps when only the head trains)."""

    def __init__(self, model: MILDNet):
        super().__init__()
        self.model = model

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (3T, pooled_dim) -> (3T, D)
        return self.model.embed_pooled(pooled)


# --------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, *, resume: bool = False, features: dict[Path, torch.Tensor] | None = None) -> dict:
    """Run (or resume) a training run; returns ``{"best": ..., "history": [...], "out": path}``.

    ``features`` (image path -> pooled taps of this model's frozen backbone) stands in for the pooling pass
    when the taps are pooled once (a benchmark that already pooled every image for another recipe)."""
    from tqdm import tqdm

    from .models import create

    world, rank, local_rank = _dist_info()
    distributed = world > 1
    device = _device(cfg, local_rank)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    main = rank == 0
    out = Path(cfg.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.select not in ("loss", "accuracy"):
        raise ValueError(f"select must be 'loss' or 'accuracy', got {cfg.select!r}")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    loss_fn = get_loss(cfg.loss)

    # -- model (seeded, so an uninterrupted run and a resumed one start from the same weights)
    torch.manual_seed(cfg.seed)
    kw = dict(cfg.model_kwargs)
    if cfg.input_size is not None:
        kw["input_size"] = cfg.input_size
    model = create(cfg.model, pretrained=cfg.pretrained, **kw).to(device)
    spec = model.spec
    if cfg.freeze_units or cfg.freeze_backbone:
        flag = "--freeze-backbone" if cfg.freeze_backbone else "--freeze-units"
        units = getattr(getattr(model, "backbone", None), "units", None)
        if units is None:
            raise ValueError(f"{cfg.model} has no backbone units to freeze ({flag})")
        units = units()
        n = len(units) if cfg.freeze_backbone else cfg.freeze_units
        if not 0 < n <= len(units):
            raise ValueError(f"--freeze-units must be in 1..{len(units)} for {cfg.model}, got {n}")
        model.freeze(list(dict.fromkeys([*model.frozen_modules(), *units[:n]])))
    params = list(model.trainable_parameters())
    if not params:
        raise ValueError(f"{cfg.model} has no trainable parameters (a zero-shot baseline): evaluate it instead")
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.resolved_lr(), momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.resolved_lr(), weight_decay=cfg.weight_decay)

    # -- data
    train_rows, _ = read_triplets(cfg.train, cfg.image_root, allow_outside_root=cfg.allow_outside_root)
    train_rows, _ = _subset(train_rows, None, cfg.max_train_triplets, cfg.seed)
    val_rows, val_kinds = ([], None)
    if cfg.val:
        val_rows, val_kinds = read_triplets(cfg.val, cfg.image_root, allow_outside_root=cfg.allow_outside_root)
        val_rows, val_kinds = _subset(val_rows, val_kinds, cfg.max_val_triplets, cfg.seed)
    cache_path = Path(cfg.cache) if cfg.cache else out / f"images_{spec.input_size}.pt"
    all_paths = [p for t in train_rows + val_rows for p in t]
    if distributed:  # rank 0 decodes and writes the cache, the others read it
        if main:
            ImageCache.build(all_paths, spec, cache_path, progress=cfg.progress)
        dist.barrier()
    cache = ImageCache.build(all_paths, spec, cache_path, progress=cfg.progress and main)
    for msg in cache.bad:
        if main:
            print(f"skipped unreadable image: {msg}", file=sys.stderr)
    pooled = None  # Tensor[len(cache), pooled_dim] when only the head trains on unaugmented images
    if cfg.pool_once and not cfg.augment and _pools_once(model):
        if main:
            print(f"only the head trains and images are not augmented: pooling the taps of {len(cache)} images "
                  "once, then training on them", flush=True)
        pooled = (torch.stack([features[p] for p in cache.paths]) if features is not None else
                  torch.from_numpy(embed_images(model, cache.images, batch_size=64, device=device,
                                                forward=model.pool, progress=cfg.progress and main,
                                                desc="pooling taps")))
    train_set = TripletDataset(cache, train_rows, PaperAugment() if cfg.augment else None, seed=cfg.seed,
                               table=pooled)
    val_index = None
    if val_rows:
        usable = [i for i, t in enumerate(val_rows) if all(p in cache for p in t)]
        val_index = torch.tensor([cache.rows(val_rows[i]) for i in usable], dtype=torch.long)  # (V, 3)
        val_kinds = [val_kinds[i] for i in usable] if val_kinds else None
        val_images_rows = torch.unique(val_index)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.workers > 0)
    if len(loader) == 0:
        raise ValueError(f"{len(train_set)} training triplets make no full batch of {cfg.batch_size} "
                         f"per process ({world} process(es)); lower --batch-size")

    net: torch.nn.Module = model if pooled is None else _PooledHead(model)
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = cfg.amp and device.type == "cuda"

    def validate() -> dict[str, float]:
        if val_index is None:
            return {}
        emb = torch.zeros((len(cache), model.embedding_dim))
        if pooled is None:
            emb[val_images_rows] = torch.from_numpy(embed_images(model, cache.images[val_images_rows],
                                                                 batch_size=max(64, cfg.batch_size * 3),
                                                                 device=device))
        else:  # eval mode (no dropout) as embed_images does, then back to the mode the model was in
            was_training = model.training
            model.eval()
            with torch.no_grad():
                emb[val_images_rows] = model.embed_pooled(pooled[val_images_rows].to(device)).float().cpu()
            model.train(was_training)
        return triplet_metrics(emb, val_index, cfg.loss, cfg.margin, val_kinds)

    # -- state: fresh or resumed
    history: list[dict] = []
    best: dict[str, Any] = {}
    start_epoch, step = 0, 0
    last_path = out / "last.pt"
    if resume and last_path.is_file():
        try:
            state = torch.load(last_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{last_path}: cannot resume from it ({type(e).__name__}: {e})") from None
        saved = state.get("config", {})
        for key in ("model", "train", "seed", "batch_size", "loss", "optimizer"):
            if saved.get(key) != getattr(cfg, key):
                raise ValueError(f"--resume: {last_path} was written with {key}={saved.get(key)!r}, this run "
                                 f"has {key}={getattr(cfg, key)!r}; use another --out or the same settings")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        history, best = list(state["history"]), dict(state["best"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        if main:
            print(f"resuming {out} after epoch {start_epoch} (step {step})")
    elif resume and main:
        print(f"--resume: no {last_path} yet, starting fresh")

    if start_epoch == 0 and not history:
        v = validate()
        history.append({"epoch": 0, "step": 0, "train_loss": float("nan"), "train_accuracy": float("nan"),
                        **{f"val_{k}": x for k, x in v.items() if k != "triplets"}, "lr": cfg.resolved_lr(),
                        "seconds": 0.0})
        if main:
            _write_logs(out, cfg, history, best)

    stopped = False
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.time()
        torch.manual_seed(_seed(cfg.seed, epoch, 1))  # dropout draws: a function of (seed, epoch)
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        model.train()
        if cfg.freeze_bn:
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and main), leave=False)
        for batch in bar:
            if cfg.max_steps is not None and step >= cfg.max_steps:
                stopped = True
                break
            x = stack_triplets(batch).to(device, non_blocking=True)  # (3T, 3, S, S) images or (3T, F) pooled
            if pooled is None:
                x = normalize(x, spec)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                emb = net(x)  # (3T, D): one forward for the whole triplet batch
            q, p, n = split_triplets(emb.float())
            loss = loss_fn(q, p, n, margin=cfg.margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            t = q.shape[0]
            loss_sum += loss.item() * t
            correct += int(triplet_correct(q.detach(), p.detach(), n.detach()).sum())
            seen += t
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        if stopped:
            if main:
                print(f"stopped after {step} steps (--max-steps); --resume continues from epoch {epoch - 1}")
            break
        if distributed:  # epoch means over every process
            t = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
            dist.all_reduce(t)
            loss_sum, correct, seen = float(t[0]), int(t[1]), int(t[2])
        v = validate()
        row = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(seen, 1),
               "train_accuracy": correct / max(seen, 1), **{f"val_{k}": x for k, x in v.items() if k != "triplets"},
               "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)}
        history.append(row)
        score = v.get(cfg.select) if v else row[f"train_{cfg.select}"]
        better = not best or (score < best["score"] if cfg.select == "loss" else score > best["score"])
        if main:
            if better:
                best = {"epoch": epoch, "score": score, "select": cfg.select,
                        "val_loss": v.get("loss"), "val_accuracy": v.get("accuracy")}
                save_checkpoint(out / "best.pt", model, variant=model.variant, model_kwargs=model.model_kwargs,
                                extra={"epoch": epoch, "val_loss": v.get("loss"), "val_accuracy": v.get("accuracy"),
                                       "training": json.dumps(asdict(cfg))})
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                               "step": step, "history": history, "best": best, "rng": _rng_state(device),
                               "config": asdict(cfg)}, last_path)
            _write_logs(out, cfg, history, best)
            print(f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
                  + (f" | val loss {v['loss']:.4f} acc {v['accuracy']:.4f}" if v else "")
                  + f" | {row['seconds']:.0f}s" + (" *" if better else ""), flush=True)
        elif better:
            best = {"epoch": epoch, "score": score}
        if distributed:
            dist.barrier()
    if distributed:
        dist.destroy_process_group()
    return {"best": best, "history": history, "out": str(out), "stopped": stopped, "step": step}


# --------------------------------------------------------------------------------------------- CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    from .metric_train import add_arguments

    add_arguments(p)  # --catalogue: the default recipe (mildnet.metric_train)
    p.add_argument("--train", help="the paper's recipe on a triplets CSV (q,p,n; from `mildnet triplets`)")
    p.add_argument("--val", help="validation triplets CSV (validated every epoch)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--model", help="model zoo name (default mildnet_effnet_lite0 with --catalogue, "
                                   "mildnet_mobile with --train)")
    p.add_argument("--pretrained", action="store_true", help="start from ImageNet backbone weights")
    p.add_argument("--input-size", type=int, help="override the model's input size (e.g. 128 on a CPU)")
    p.add_argument("--tap-norm", action="store_true",
                   help="L2-normalise each pooled tap before the concat (MobileNet/EfficientNet models)")
    p.add_argument("--image-root", help="folder the triplet paths are relative to (default: from summary.json)")
    p.add_argument("--allow-outside-root", action="store_true")
    p.add_argument("--loss", choices=(*LOSSES, *BATCH_LOSSES),
                   help=f"--catalogue: one of {BATCH_LOSSES} (default proxy_anchor); --train: one of "
                        f"{tuple(LOSSES)} (default hinge)")
    p.add_argument("--margin", type=float, default=1.0)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    p.add_argument("--lr", type=float, help="learning rate (default: 1e-3, 1e-4 for mildnet_512)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD Nesterov momentum")
    p.add_argument("--weight-decay", type=float, help="default 1e-4 with --catalogue, 0 with --train")
    p.add_argument("--epochs", type=int, help="default 30 with --catalogue, 20 with --train")
    p.add_argument("--batch-size", type=int, default=16, help="triplets per step per process (3x images)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true", help="turn the paper's augmentations off")
    p.add_argument("--max-train-triplets", type=int, help="use a fixed random subset of the training triplets")
    p.add_argument("--max-val-triplets", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps in all (resumable)")
    p.add_argument("--select", choices=("loss", "accuracy"), default="loss",
                   help="keep the checkpoint with the best val loss (paper) or accuracy")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--cache", help="decoded-image cache file (default: <out>/images_<size>.pt)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--freeze-units", type=int,
                   help="freeze the first N backbone units (more than the model's own freezing; faster on a CPU)")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="freeze the whole backbone: only the dense head trains (with --no-augment, each image's "
                        "taps are pooled once and training runs on them, minutes instead of hours on a CPU)")
    p.add_argument("--no-pool-once", action="store_true",
                   help="run the frozen backbone on every step even when only the head trains (for comparison)")
    p.add_argument("--freeze-bn", action="store_true",
                   help="keep BatchNorm layers on their pretrained statistics (small triplet batches)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        train=str(Path(args.train).resolve()), val=str(Path(args.val).resolve()) if args.val else None,
        out=args.out, model=args.model or "mildnet_mobile", pretrained=args.pretrained, input_size=args.input_size,
        image_root=args.image_root, allow_outside_root=args.allow_outside_root, loss=args.loss or "hinge",
        margin=args.margin,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay or 0.0,
        epochs=args.epochs or 20, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
        augment=not args.no_augment, max_train_triplets=args.max_train_triplets,
        max_val_triplets=args.max_val_triplets, max_steps=args.max_steps, select=args.select, device=args.device,
        amp=not args.no_amp, cache=args.cache, threads=args.threads, progress=not args.no_progress,
        freeze_units=args.freeze_units, freeze_backbone=args.freeze_backbone, pool_once=not args.no_pool_once,
        freeze_bn=args.freeze_bn,
        model_kwargs={"tap_norm": True} if args.tap_norm else {})


def run(args: argparse.Namespace) -> int:
    if bool(args.catalogue) == bool(args.train):
        raise ValueError("give --catalogue CATALOGUE (the default recipe) or --train TRIPLETS.csv (the paper's "
                         "triplet recipe), not " + ("both" if args.catalogue else "neither"))
    if args.catalogue:
        from .metric_train import run_catalogue
        return run_catalogue(args)
    if args.loss is not None and args.loss not in LOSSES:
        raise ValueError(f"--train (the triplet recipe) takes --loss {'/'.join(LOSSES)}, got {args.loss!r}")
    result = train(config_from_args(args), resume=args.resume)
    if _dist_info()[1] == 0:
        b = result["best"]
        if b:
            print(f"best: epoch {b['epoch']} ({b['select']} {b['score']:.4f}) -> {Path(args.out) / 'best.pt'}")
    return 0
