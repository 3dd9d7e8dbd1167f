"""Accuracy study on Grocery (train split -> val): zero-shot backbone vs trained MILDNet-Mobile vs tap ablations.

For each model: val triplet accuracy (the paper's metric; val triplets include in-class negatives) and
retrieval recall@1/5/10 + mAP, photo -> catalogue (store photos -> iconic images) and photo -> photo.
Paper target: >= 93.69% triplet accuracy (Street2Shop topwear; Grocery is the closest real data here).

Default run is a quick look sized for a shared 2-core CPU: 96 px, the ImageNet backbone frozen (only the
dense head trains, the taps still feed it), a fixed random subset of the training triplets, few epochs. With the
backbone frozen and no augmentation, `mildnet train` pools each image's taps once and trains the head on them,
so the full study at the paper's 224 px on every training triplet also fits on this machine:

    .venv/bin/python bench/accuracy.py                       # quick look (96 px, 800 triplets an epoch)
    .venv/bin/python bench/accuracy.py --input-size 224 --train-triplets 0 --epochs 8 --loss contrastive \
        --lr 1e-4 --models mildnet_effnet_lite0,mildnet_mobile --zero-shot mobilenet_v1_gap,effnet_lite0_gap

Writes bench/results/accuracy.json (settings, machine, timestamp, one entry per model, written after each
model so a cut-short run keeps what it finished) and bench/results/accuracy.md (the table).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mildnet.data.catalogue import grocery_catalogue  # noqa: E402
from mildnet.data.datasets import ImageCache  # noqa: E402
from mildnet.data.triplets import TripletOptions, make_triplets, write_triplets  # noqa: E402
from mildnet.evaluate import evaluate  # noqa: E402
from mildnet.fileio import atomic_write_text  # noqa: E402
from mildnet.models import create, load_checkpoint, model_info  # noqa: E402
from mildnet.train import TrainConfig, train  # noqa: E402

PAPER_TARGET = 0.9369
# the full model and the no-taps ablation first: if a run is cut short, the headline comparison exists
ALL_TRAINED = ("mildnet_mobile", "mildnet_mobile_noskip", "mildnet_mobile_skip1", "mildnet_mobile_skip2",
               "mildnet_mobile_skip3")


def _row(name: str, kind: str, rep: dict, extra: dict) -> dict:
    t, r = rep.get("triplets", {}), rep.get("retrieval", {})
    pc, pp = r.get("photo_to_catalogue", {}), r.get("photo_to_photo", {})
    return {"model": name, "kind": kind, "val_triplet_accuracy": t.get("accuracy"),
            "val_triplet_accuracy_in_class": t.get("accuracy_in_class"),
            "val_triplet_accuracy_out_class": t.get("accuracy_out_class"), "val_triplets": t.get("triplets"),
            **{f"photo_to_catalogue_{k}": pc.get(k) for k in ("recall@1", "recall@5", "recall@10", "mAP")},
            **{f"photo_to_photo_{k}": pp.get(k) for k in ("recall@1", "mAP")},
            "self_retrieval_top1": r.get("self_retrieval", {}).get("top1_is_self"),
            "embedding_dim": rep.get("embedding_dim"), "paper_model": model_info(name).paper, **extra}


def _fmt(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}" if isinstance(x, float) else str(x)


def table(rows: list[dict]) -> str:
    cols = [("model", "model"), ("val_triplet_accuracy", "triplet acc %"), ("val_triplet_accuracy_in_class",
            "in-class %"), ("val_triplet_accuracy_out_class", "out-class %"),
            ("photo_to_catalogue_recall@1", "photo->cat R@1 %"), ("photo_to_catalogue_recall@5", "R@5 %"),
            ("photo_to_catalogue_mAP", "mAP %"), ("photo_to_photo_recall@1", "photo->photo R@1 %"),
            ("train_seconds", "train s")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) if k != "train_seconds" else
                                        (f"{r[k]:.0f}" if r.get(k) else "-") for k, _ in cols) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grocery", default=str(ROOT.parent / "shared" / "data" / "grocery"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_accuracy"), help="run folders and caches")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "accuracy.json"))
    ap.add_argument("--models", default=",".join(ALL_TRAINED), help="trained models, comma-separated")
    ap.add_argument("--zero-shot", default="mobilenet_v1_gap",
                    help="zero-shot baselines, comma-separated ('' for none)")
    ap.add_argument("--input-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-triplets", type=int, default=800, help="random subset of train triplets (0: all)")
    ap.add_argument("--per-query", type=int, default=8, help="triplets per query photo (train and val)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--optimizer", default="adamw", choices=("sgd", "adamw"))
    ap.add_argument("--loss", default="hinge", choices=("hinge", "batch_hinge", "contrastive"))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--freeze-units", type=int, default=-1,
                    help="backbone units frozen (-1: the whole backbone, only the head trains; 0: the model's own)")
    ap.add_argument("--tap-norm", action="store_true", help="L2-normalise each pooled tap (ours, not the paper's)")
    ap.add_argument("--augment", action="store_true", help="the paper's augmentations (off by default: speed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    items = grocery_catalogue(args.grocery)
    options = TripletOptions(per_query=args.per_query, seed=args.seed)
    summary = write_triplets(work / "triplets", make_triplets(items, options), items, options=options)
    train_csv, val_csv = work / "triplets" / "train.csv", work / "triplets" / "val.csv"
    settings = {k: v for k, v in vars(args).items()}
    settings["triplets"] = {s: {k: v for k, v in d.items() if k in ("triplets", "queries", "by_kind")}
                            for s, d in summary["splits"].items()}
    result = {"benchmark": "accuracy", "dataset": "Grocery Store (train -> val)", "paper_target": PAPER_TARGET,
              "settings": settings, "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                                                "platform": platform.platform(),
                                                "load_average_start": os.getloadavg()},
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": []}

    def save() -> None:
        out = Path(args.out)
        atomic_write_text(out, json.dumps(result, indent=2))
        md = out.with_suffix(".md")
        md.write_text(f"# Accuracy study (Grocery val)\n\nSettings: {json.dumps(settings)}\n\n"
                      f"{table(result['rows'])}\n\nPaper target: >= {100 * PAPER_TARGET:.2f}% triplet accuracy.\n")

    def cache(name: str) -> str:  # decoded images, shared by the models whose spec resizes alike
        key = hashlib.sha256(ImageCache.spec_key(create(name, input_size=args.input_size).spec).encode())
        return str(work / f"images_{args.input_size}_{key.hexdigest()[:8]}.pt")

    eval_kw = dict(catalogue=items, split="val", triplets=str(val_csv), progress=False, page_queries=24)
    for name in [m for m in args.zero_shot.split(",") if m]:
        t0 = time.time()
        model = create(name, pretrained=True, input_size=args.input_size).eval()
        rep = evaluate(model, out=work / name, label=f"{name} (zero-shot)", cache=cache(name), **eval_kw)
        result["rows"].append(_row(name, "zero-shot", rep, {"eval_seconds": round(time.time() - t0, 1)}))
        save()
        print(table(result["rows"]), flush=True)

    for name in [m for m in args.models.split(",") if m]:
        t0 = time.time()
        cfg = TrainConfig(train=str(train_csv), val=str(val_csv), out=str(work / name), model=name, pretrained=True,
                          input_size=args.input_size, epochs=args.epochs, batch_size=args.batch_size,
                          max_train_triplets=args.train_triplets or None, optimizer=args.optimizer, lr=args.lr,
                          loss=args.loss, augment=args.augment, freeze_backbone=args.freeze_units == -1,
                          freeze_units=args.freeze_units if args.freeze_units > 0 else None,
                          freeze_bn=args.freeze_units != 0, seed=args.seed, cache=cache(name), progress=False,
                          threads=args.threads, model_kwargs={"tap_norm": True} if args.tap_norm else {})
        res = train(cfg)
        train_s = time.time() - t0
        model = load_checkpoint(work / name / "best.pt")
        rep = evaluate(model, out=work / name, label=f"{name} (trained)", cache=cache(name), **eval_kw)
        start, *epochs = res["history"]
        result["rows"].append(_row(name, "trained", rep, {
            "train_seconds": round(train_s, 1), "best_epoch": res["best"].get("epoch"),
            "selected_by": f"lowest val {args.loss} loss (the paper's rule)",
            "val_triplet_accuracy_before_training": start.get("val_accuracy"),
            "val_triplet_accuracy_epochs_min": min(h["val_accuracy"] for h in epochs),
            "val_triplet_accuracy_epochs_max": max(h["val_accuracy"] for h in epochs),
            "val_triplet_accuracy_last_epoch": epochs[-1]["val_accuracy"],
            "history": [{k: h[k] for k in ("epoch", "train_loss", "val_loss", "val_accuracy", "seconds") if k in h}
                        for h in res["history"]]}))
        save()
        print(table(result["rows"]), flush=True)

    trained = [r for r in result["rows"] if r["kind"] == "trained" and r["val_triplet_accuracy"] is not None]
    if trained:
        best = max(trained, key=lambda r: r["val_triplet_accuracy"])
        result["target"] = {"best_model": best["model"], "val_triplet_accuracy": best["val_triplet_accuracy"],
                            "paper": PAPER_TARGET, "met": best["val_triplet_accuracy"] >= PAPER_TARGET,
                            "gap_points": round(100 * (PAPER_TARGET - best["val_triplet_accuracy"]), 2)}
    result["machine"]["load_average_end"] = os.getloadavg()
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
