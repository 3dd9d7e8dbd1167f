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
from .config import flag
from .data.datasets import ImageCache, TripletDataset, _seed, embed_images, stack_triplets
from .data.transforms import PaperAugment
from .imageio import normalize
from .data.triplets import read_triplets
from .errors import UsageError
from .fileio import atomic_open, atomic_write_text
from .losses import BATCH_LOSSES, LOSSES, get_loss, split_triplets, triplet_correct
from .metrics import triplet_metrics
from .models import create, model_info
from .models.head import MILDNet

__all__ = ["TrainConfig", "train"]


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in ``last.pt`` and ``metrics.json``). Each field with
    ``flag(...)`` metadata is also the ``mildnet train`` flag of that name (:mod:`mildnet.config`); a flag whose
    default is None here takes the recipe's default (``--catalogue`` and ``--train`` share it)."""

    train: str = field(metadata=flag("the paper's recipe on a triplets CSV (q,p,n; from `mildnet triplets`)"))
    val: str | None = field(default=None, metadata=flag("validation triplets CSV (validated every epoch)"))
    out: str = field(default="runs/mildnet", metadata=flag("run folder", required=True))
    model: str = field(default="mildnet_mobile", metadata=flag(
        "model zoo name (default mildnet_effnet_lite0 with --catalogue, mildnet_mobile with --train)", default=None))
    pretrained: bool = field(default=False, metadata=flag("start from ImageNet backbone weights"))
    input_size: int | None = field(default=None, metadata=flag("override the model's input size (e.g. 128 on a CPU)"))
    image_root: str | None = field(default=None, metadata=flag(
        "folder the triplet paths are relative to (default: from summary.json)"))
    allow_outside_root: bool = field(default=False, metadata=flag())
    loss: str = field(default="hinge", metadata=flag(
        f"--catalogue: one of {BATCH_LOSSES} (default proxy_anchor); --train: one of {tuple(LOSSES)} (default hinge)",
        choices=(*LOSSES, *BATCH_LOSSES), default=None))
    margin: float = field(default=1.0, metadata=flag())
    optimizer: str = field(default="sgd", metadata=flag(choices=("sgd", "adamw")))
    lr: float | None = field(default=None, metadata=flag(  # None: the paper's rate for the model (its registry entry)
        "learning rate (default: 1e-3, 1e-4 for mildnet_512)"))
    momentum: float = field(default=0.9, metadata=flag("SGD Nesterov momentum"))
    weight_decay: float = field(default=0.0, metadata=flag("default 1e-4 with --catalogue, 0 with --train",
                                                           default=None))
    epochs: int = field(default=20, metadata=flag("default 30 with --catalogue, 20 with --train", default=None))
    batch_size: int = field(default=16, metadata=flag("triplets per step per process (3x images)"))
    workers: int = field(default=0, metadata=flag("DataLoader worker processes"))
    seed: int = field(default=0, metadata=flag())
    augment: bool = field(default=True, metadata=flag("turn the paper's augmentations off"))
    max_train_triplets: int | None = field(default=None, metadata=flag(
        "use a fixed random subset of the training triplets"))
    max_val_triplets: int | None = field(default=None, metadata=flag())
    max_steps: int | None = field(default=None, metadata=flag(  # a budget; resumable
        "stop after this many optimiser steps in all (resumable)"))
    select: str = field(default="loss", metadata=flag(
        "keep the checkpoint with the best val loss (paper) or accuracy", choices=("loss", "accuracy")))
    device: str = field(default="auto", metadata=flag("auto, cpu, cuda or cuda:N"))
    amp: bool = field(default=True, metadata=flag("no bf16 autocast on CUDA"))  # bf16 autocast on CUDA only
    cache: str | None = field(default=None, metadata=flag(
        "decoded-image cache file (default: <out>/images_<size>.pt)"))
    threads: int | None = field(default=None, metadata=flag("torch CPU threads"))
    freeze_units: int | None = field(default=None, metadata=flag(
        "freeze the first N backbone units (more than the model's own freezing; faster on a CPU)"))
    freeze_backbone: bool = field(default=False, metadata=flag(
        "freeze the whole backbone: only the dense head trains (with --no-augment, each image's taps are pooled "
        "once and training runs on them, minutes instead of hours on a CPU)"))
    pool_once: bool = field(default=True, metadata=flag(  # see _pools_once
        "run the frozen backbone on every step even when only the head trains (for comparison)"))
    freeze_bn: bool = field(default=False, metadata=flag(
        "keep BatchNorm layers on their pretrained statistics (small triplet batches)"))
    progress: bool = field(default=True, metadata=flag())
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # --tap-norm: {"tap_norm": True}

    def resolved_lr(self) -> float:
        """``lr``, else the paper's rate for the model (its registry entry)."""
        return self.lr if self.lr is not None else model_info(self.model).lr


# --------------------------------------------------------------------------------------------- helpers
def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is available")
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


# --------------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class _Process:
    """This process's place in a (possibly distributed) run."""

    world: int
    rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:  # only rank 0 writes files and prints
        return self.rank == 0


@dataclass
class _Data:
    """The decoded images and the triplets over them."""

    cache: ImageCache
    train_set: TripletDataset
    pooled: torch.Tensor | None  # Tensor[len(cache), pooled_dim] when only the head trains on unaugmented images
    val_index: torch.Tensor | None  # (V, 3) rows into the cache
    val_kinds: list[str] | None
    val_image_rows: torch.Tensor | None


@dataclass
class _State:
    """What ``last.pt`` keeps between epochs."""

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)


def start_process(cfg: TrainConfig) -> _Process:
    """Device, process group (under torchrun) and CPU threads."""
    world, rank, local_rank = _dist_info()
    device = _device(cfg, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return _Process(world, rank, device)


def check_config(cfg: TrainConfig) -> None:
    """The settings checked before anything is built (the loss name by :func:`get_loss`)."""
    if cfg.select not in ("loss", "accuracy"):
        raise UsageError(f"select must be 'loss' or 'accuracy', got {cfg.select!r}")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise UsageError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    get_loss(cfg.loss)


def build_model(cfg: TrainConfig, device: torch.device) -> MILDNet:
    """The zoo model, seeded (an uninterrupted run and a resumed one start from the same weights), with the
    backbone units ``--freeze-units`` / ``--freeze-backbone`` ask for frozen."""
    torch.manual_seed(cfg.seed)
    kw = dict(cfg.model_kwargs)
    if cfg.input_size is not None:
        kw["input_size"] = cfg.input_size
    model = create(cfg.model, pretrained=cfg.pretrained, **kw).to(device)
    if cfg.freeze_units or cfg.freeze_backbone:
        flag = "--freeze-backbone" if cfg.freeze_backbone else "--freeze-units"
        units = getattr(getattr(model, "backbone", None), "units", None)
        if units is None:
            raise UsageError(f"{cfg.model} has no backbone units to freeze ({flag})")
        units = units()
        n = len(units) if cfg.freeze_backbone else cfg.freeze_units
        if not 0 < n <= len(units):
            raise UsageError(f"--freeze-units must be in 1..{len(units)} for {cfg.model}, got {n}")
        model.freeze(list(dict.fromkeys([*model.frozen_modules(), *units[:n]])))
    return model


def make_optimizer(cfg: TrainConfig, model: MILDNet) -> torch.optim.Optimizer:
    params = list(model.trainable_parameters())
    if not params:
        raise UsageError(f"{cfg.model} has no trainable parameters (a zero-shot baseline): evaluate it instead")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.resolved_lr(), momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.resolved_lr(), weight_decay=cfg.weight_decay)


def load_data(cfg: TrainConfig, model: MILDNet, out: Path, proc: _Process,
              features: dict[Path, torch.Tensor] | None) -> _Data:
    """Triplets -> the decoded-image cache (rank 0 writes it, the others read it) -> the training set; the
    taps pooled once when only the head trains on unaugmented images (see :func:`_pools_once`)."""
    train_rows, _ = read_triplets(cfg.train, cfg.image_root, allow_outside_root=cfg.allow_outside_root)
    train_rows, _ = _subset(train_rows, None, cfg.max_train_triplets, cfg.seed)
    val_rows, val_kinds = ([], None)
    if cfg.val:
        val_rows, val_kinds = read_triplets(cfg.val, cfg.image_root, allow_outside_root=cfg.allow_outside_root)
        val_rows, val_kinds = _subset(val_rows, val_kinds, cfg.max_val_triplets, cfg.seed)
    cache_path = Path(cfg.cache) if cfg.cache else out / f"images_{model.spec.input_size}.pt"
    all_paths = [p for t in train_rows + val_rows for p in t]
    if proc.distributed:
        if proc.main:
            ImageCache.build(all_paths, model.spec, cache_path, progress=cfg.progress)
        dist.barrier()
    cache = ImageCache.build(all_paths, model.spec, cache_path, progress=cfg.progress and proc.main)
    for msg in cache.bad:
        if proc.main:
            print(f"skipped unreadable image: {msg}", file=sys.stderr)
    pooled = None
    if cfg.pool_once and not cfg.augment and _pools_once(model):
        if proc.main:
            print(f"only the head trains and images are not augmented: pooling the taps of {len(cache)} images "
                  "once, then training on them", flush=True)
        pooled = (torch.stack([features[p] for p in cache.paths]) if features is not None else
                  torch.from_numpy(embed_images(model, cache.images, batch_size=64, device=proc.device,
                                                forward=model.pool, progress=cfg.progress and proc.main,
                                                desc="pooling taps")))
    train_set = TripletDataset(cache, train_rows, PaperAugment() if cfg.augment else None, seed=cfg.seed,
                               table=pooled)
    val_index = val_image_rows = None
    if val_rows:
        usable = [i for i, t in enumerate(val_rows) if all(p in cache for p in t)]
        val_index = torch.tensor([cache.rows(val_rows[i]) for i in usable], dtype=torch.long)  # (V, 3)
        val_kinds = [val_kinds[i] for i in usable] if val_kinds else None
        val_image_rows = torch.unique(val_index)
    return _Data(cache, train_set, pooled, val_index, val_kinds, val_image_rows)


def make_loader(cfg: TrainConfig, data: _Data, proc: _Process) -> tuple[DistributedSampler, DataLoader]:
    """Each process's share of every epoch's shuffled triplets (``set_epoch`` makes the order a function of
    (seed, epoch)); full batches only."""
    sampler = DistributedSampler(data.train_set, num_replicas=proc.world, rank=proc.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = DataLoader(data.train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        drop_last=True, pin_memory=proc.device.type == "cuda",
                        persistent_workers=cfg.workers > 0)
    if len(loader) == 0:
        raise UsageError(f"{len(data.train_set)} training triplets make no full batch of {cfg.batch_size} "
                         f"per process ({proc.world} process(es)); lower --batch-size")
    return sampler, loader


def wrap_model(model: MILDNet, data: _Data, proc: _Process) -> torch.nn.Module:
    """What the optimiser steps through: the model, or its head above the pooled taps; DDP when distributed."""
    net: torch.nn.Module = model if data.pooled is None else _PooledHead(model)
    if proc.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
    return net


def validate(cfg: TrainConfig, model: MILDNet, data: _Data, device: torch.device) -> dict[str, float]:
    """Loss and accuracy on the validation triplets ({} without ``--val``)."""
    if data.val_index is None:
        return {}
    emb = torch.zeros((len(data.cache), model.embedding_dim))
    rows = data.val_image_rows
    if data.pooled is None:
        emb[rows] = torch.from_numpy(embed_images(model, data.cache.images[rows],
                                                  batch_size=max(64, cfg.batch_size * 3), device=device))
    else:  # eval mode (no dropout) as embed_images does, then back to the mode the model was in
        was_training = model.training
        model.eval()
        with torch.no_grad():
            emb[rows] = model.embed_pooled(data.pooled[rows].to(device)).float().cpu()
        model.train(was_training)
    return triplet_metrics(emb, data.val_index, cfg.loss, cfg.margin, data.val_kinds)


def resume_state(cfg: TrainConfig, model: MILDNet, opt: torch.optim.Optimizer, last_path: Path,
                 proc: _Process) -> _State:
    """Model, optimiser, counters and RNG from ``last.pt``, refusing one written with other settings."""
    try:
        state = torch.load(last_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{last_path}: cannot resume from it ({type(e).__name__}: {e})") from None
    saved = state.get("config", {})
    for key in ("model", "train", "seed", "batch_size", "loss", "optimizer"):
        if saved.get(key) != getattr(cfg, key):
            raise UsageError(f"--resume: {last_path} was written with {key}={saved.get(key)!r}, this run "
                             f"has {key}={getattr(cfg, key)!r}; use another --out or the same settings")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if proc.device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], proc.device)
    return _State(int(state["epoch"]), int(state["step"]), list(state["history"]), dict(state["best"]))


def train_epoch(cfg: TrainConfig, epoch: int, state: _State, model: MILDNet, net: torch.nn.Module, data: _Data,
                loader: DataLoader, opt: torch.optim.Optimizer, proc: _Process) -> tuple[float, int, int, bool]:
    """One pass over this process's batches: (loss sum, correct, triplets seen, stopped by --max-steps);
    ``state.step`` counts the optimiser steps."""
    from tqdm import tqdm

    loss_fn = get_loss(cfg.loss)
    use_amp = cfg.amp and proc.device.type == "cuda"
    model.train()
    if cfg.freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and proc.main), leave=False)
    for batch in bar:
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            bar.close()
            return loss_sum, correct, seen, True
        x = stack_triplets(batch).to(proc.device, non_blocking=True)  # (3T, 3, S, S) images or (3T, F) pooled
        if data.pooled is None:
            x = normalize(x, model.spec)
        with torch.autocast(proc.device.type, dtype=torch.bfloat16, enabled=use_amp):
            emb = net(x)  # (3T, D): one forward for the whole triplet batch
        q, p, n = split_triplets(emb.float())
        loss = loss_fn(q, p, n, margin=cfg.margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state.step += 1
        t = q.shape[0]
        loss_sum += loss.item() * t
        correct += int(triplet_correct(q.detach(), p.detach(), n.detach()).sum())
        seen += t
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    bar.close()
    return loss_sum, correct, seen, False


def end_epoch(cfg: TrainConfig, epoch: int, state: _State, row: dict, v: dict, model: MILDNet,
              opt: torch.optim.Optimizer, out: Path, proc: _Process) -> bool:
    """Record the epoch: the best checkpoint when it is better, ``last.pt``, the logs (rank 0). Returns
    whether it was the best so far."""
    state.history.append(row)
    score = v.get(cfg.select) if v else row[f"train_{cfg.select}"]
    better = not state.best or (score < state.best["score"] if cfg.select == "loss" else score > state.best["score"])
    if not proc.main:
        if better:
            state.best = {"epoch": epoch, "score": score}
        return better
    if better:
        state.best = {"epoch": epoch, "score": score, "select": cfg.select,
                      "val_loss": v.get("loss"), "val_accuracy": v.get("accuracy")}
        save_checkpoint(out / "best.pt", model, variant=model.variant, model_kwargs=model.model_kwargs,
                        extra={"epoch": epoch, "val_loss": v.get("loss"), "val_accuracy": v.get("accuracy"),
                               "training": json.dumps(asdict(cfg))})
    atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                       "step": state.step, "history": state.history, "best": state.best,
                       "rng": _rng_state(proc.device), "config": asdict(cfg)}, out / "last.pt")
    _write_logs(out, cfg, state.history, state.best)
    print(f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
          + (f" | val loss {v['loss']:.4f} acc {v['accuracy']:.4f}" if v else "")
          + f" | {row['seconds']:.0f}s" + (" *" if better else ""), flush=True)
    return better


# --------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, *, resume: bool = False, features: dict[Path, torch.Tensor] | None = None) -> dict:
    """Run (or resume) a training run; returns ``{"best": ..., "history": [...], "out": path}``.

    ``features`` (image path -> pooled taps of this model's frozen backbone) stands in for the pooling pass
    when the taps are pooled once (a benchmark that already pooled every image for another recipe)."""
    proc = start_process(cfg)
    out = Path(cfg.out)
    if proc.main:
        out.mkdir(parents=True, exist_ok=True)
    check_config(cfg)
    model = build_model(cfg, proc.device)
    opt = make_optimizer(cfg, model)
    data = load_data(cfg, model, out, proc, features)
    sampler, loader = make_loader(cfg, data, proc)
    net = wrap_model(model, data, proc)

    state, last_path = _State(), out / "last.pt"
    if resume and last_path.is_file():
        state = resume_state(cfg, model, opt, last_path, proc)
        if proc.main:
            print(f"resuming {out} after epoch {state.epoch} (step {state.step})")
    elif resume and proc.main:
        print(f"--resume: no {last_path} yet, starting fresh")
    if state.epoch == 0 and not state.history:
        v = validate(cfg, model, data, proc.device)
        state.history.append({"epoch": 0, "step": 0, "train_loss": float("nan"), "train_accuracy": float("nan"),
                              **{f"val_{k}": x for k, x in v.items() if k != "triplets"}, "lr": cfg.resolved_lr(),
                              "seconds": 0.0})
        if proc.main:
            _write_logs(out, cfg, state.history, state.best)

    stopped = False
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        t0 = time.time()
        torch.manual_seed(_seed(cfg.seed, epoch, 1))  # dropout draws: a function of (seed, epoch)
        sampler.set_epoch(epoch)
        data.train_set.set_epoch(epoch)
        loss_sum, correct, seen, stopped = train_epoch(cfg, epoch, state, model, net, data, loader, opt, proc)
        if stopped:
            if proc.main:
                print(f"stopped after {state.step} steps (--max-steps); --resume continues from epoch {epoch - 1}")
            break
        if proc.distributed:  # epoch means over every process
            t = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
            dist.all_reduce(t)
            loss_sum, correct, seen = float(t[0]), int(t[1]), int(t[2])
        v = validate(cfg, model, data, proc.device)
        row = {"epoch": epoch, "step": state.step, "train_loss": loss_sum / max(seen, 1),
               "train_accuracy": correct / max(seen, 1), **{f"val_{k}": x for k, x in v.items() if k != "triplets"},
               "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)}
        end_epoch(cfg, epoch, state, row, v, model, opt, out, proc)
        if proc.distributed:
            dist.barrier()
    if proc.distributed:
        dist.destroy_process_group()
    return {"best": state.best, "history": state.history, "out": str(out), "stopped": stopped, "step": state.step}
