"""Write the measured tables and figures of docs/results.md (and the README's headline) from bench/results/*.json:
the only place those numbers, and the settings described beside them, are written.

    python bench/report.py            # rewrite the generated blocks of README.md and docs/results.md in place
    python bench/report.py --check    # exit 1 if either is out of date (tests/test_readme.py does this)

Each document marks a generated block with ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``; everything
between the markers belongs to this script, and each renderer's block appears once across the documents. The
prose in a block (sizes, threads, recipes, loads) is read from the JSON's settings, never typed here; each block
names the JSON it came from and the command that regenerates it, so a reader can check any number in one step.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`
from mildnet.fileio import atomic_write_text  # noqa: E402
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
RESULTS_DOC = ROOT / "docs" / "results.md"
DOCS = (README, RESULTS_DOC)
BLOCK = re.compile(r"(<!-- bench:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)


def load(name: str) -> dict:
    path = RESULTS / name
    if not path.exists():
        raise FileNotFoundError(f"{path.relative_to(ROOT)} is missing: run the benchmark that writes it")
    return json.loads(path.read_text())


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule] + [[str(c) for c in row] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def source(files: list[str], command: str) -> str:
    names = ", ".join(f"`bench/results/{f}`" for f in files)
    return f"_From {names}; regenerate with `{command}`._"


def verdict(met: bool | str) -> str:
    if isinstance(met, str):  # the benchmark could not decide, or says why a target cannot be met here
        return "**missed**" + met[len("missed"):] if met.startswith("missed") else met
    return "met" if met else "**missed**"


# --- one renderer per block --------------------------------------------------------------------------------

def render_params() -> str:
    by_name = {m["model"]: m for m in load("models.json")["models"]}
    ratios = load("models.json")["ratios"]
    vgg, mobile = by_name["mildnet_vgg16"], by_name["mildnet_mobile"]
    return "\n".join([
        f"MILDNet-VGG16 has exactly {vgg['params']:,} parameters ({vgg['trainable']:,} trainable), as the official "
        f"code; MILDNet-Mobile {mobile['params']:,}. The multi-scale deep-ranking baseline (`ranknet`) has "
        f"{ratios['ranknet/mildnet_vgg16']:.2f}x the parameters of MILDNet-VGG16 and "
        f"{ratios['ranknet/mildnet_mobile']:.1f}x those of MILDNet-Mobile.",
        "",
        source(["models.json"], "python bench/models.py"),
    ])


def render_zoo() -> str:
    data = load("models.json")
    rows = []
    for m in data["models"]:
        cl = m["channels_last"]
        rows.append([f"`{m['model']}`", f"{m['params'] / 1e6:.2f}", f"{m['trainable'] / 1e6:.2f}", m["embedding_dim"],
                     f"{m['size_mb']:.1f}", f"{m['flops_per_image'] / 1e9:.2f}", f"{m['params_ratio_to_vgg16']:.2f}",
                     f"{cl['latency_ms_b1']:.0f}", f"{cl['throughput_img_s_b16']:.1f}", f"{cl['roof_fraction']:.2f}"])
    settings = data["settings"]
    load_avg = settings["machine"].get("loadavg_start")
    vgg = next(m for m in data["models"] if m["model"] == "mildnet_vgg16")
    return "\n".join([
        table(["model", "params (M)", "trainable (M)", "dim", "MB", "GFLOPs/img", "params vs VGG16",
               "latency b1 (ms)", "img/s b16", "of matmul roof"], rows),
        "",
        f"CPU, {settings['threads']} threads, {settings['size']}x{settings['size']} input, channels_last, best of "
        f"{settings['reps']} runs" + (f"; the machine was shared (load average {load_avg[0]:.1f} at start), so "
                                      f"latencies are upper bounds." if load_avg and load_avg[0] > 2 else "."),
        f"\"of matmul roof\": achieved FLOP/s at batch 16 over this machine's fp32 matmul FLOP/s "
        f"({data['roof_flops'] / 1e9:.0f} GFLOP/s, measured in the same run); MILDNet-VGG16 reaches "
        f"{vgg['channels_last']['roof_fraction']:.2f} of it (target 0.8), and channels_last runs it "
        f"{vgg['channels_last_speedup_b16']:.2f}x faster than NCHW.",
        "",
        source(["models.json"], "python bench/models.py"),
    ])


ACCURACY = ("accuracy.json", "python bench/accuracy.py")
SPLIT_TITLES = (("unseen_products", "test_unseen", "Unseen products"), ("unseen_kind", "test_unseen", "Unseen kind"),
                ("unseen_products", "test_seen", "Seen products"))
ACC_COLUMNS = (("photo_to_photo_recall@1", "photo->photo R@1"), ("photo_to_photo_mAP", "photo->photo mAP"),
               ("photo_to_catalogue_recall@1", "photo->catalogue R@1"), ("photo_to_catalogue_recall@5", "R@5"),
               ("triplet_accuracy_in_class", "triplets in-class"), ("triplet_accuracy_out_class", "out-of-class"))
MODEL_LABELS = {"ours": "trained, default recipe", "paper": "trained, paper's triplet recipe"}
PAIRED = (("photo_to_photo_mAP", "photo->photo mAP"), ("photo_to_catalogue_recall@1", "photo->catalogue R@1"),
          ("photo_to_catalogue_recall@5", "R@5"))  # the metrics compared with the backbone query by query


def _ci(m: dict) -> str:
    return f"{100 * m['value']:.1f} ({100 * m['lo']:.1f}-{100 * m['hi']:.1f})"


def _split_sentence(scheme: str, e: dict) -> str:
    sp = e["split"]
    products = sp["products"]
    held = (f"all {products['test']} products of one kind" if scheme == "unseen_kind" else
            f"{products['test']} of the {sum(products.values())} products")
    return (f"{held} held out; trained on "
            f"{sp['photos']['fit']} photos and {sp['fit_catalogue_images']} catalogue images of "
            f"{sp['products']['fit']} products; epoch chosen on {sp['photos']['dev_unseen']} photos of "
            f"{sp['products']['dev']} more held-out products and {sp['photos']['dev_seen']} held-out photos of "
            f"training products")


def render_accuracy() -> str:
    name, command = ACCURACY
    res = load(name)
    st, zs = res["settings"], res["settings"]["zero_shot"]
    out = []
    for scheme, role, title in SPLIT_TITLES:
        if scheme not in res["schemes"]:
            continue
        e = res["schemes"][scheme]
        rows = []
        for model, m in e["models"].items():
            if role not in m.get("splits", {}):
                continue
            sp = m["splits"][role]
            label = f"`{zs}`, {m['kind']}" if m["kind"].startswith("zero-shot") else MODEL_LABELS.get(model, model)
            rows.append([label, *[_ci(sp["metrics"][k]) for k, _ in ACC_COLUMNS],
                         f"{sp['spread']['same_class_mean_cosine']:.2f} / {sp['spread']['other_class_mean_cosine']:.2f}",
                         f"{sp['spread']['catalogue_mean_cosine']:.2f}"])
        q = e["models"][zs]["splits"][role]["queries"]
        out += [f"**{title}** ({q['photos']} query photos of {q['products']} products; "
                + (_split_sentence(scheme, e) if role == "test_unseen" else
                   "val photos of the training products, never trained on") + "):", "",
                table(["model", *[c for _, c in ACC_COLUMNS], "cosine same / other", "catalogue cosine"], rows,
                      "l" + "r" * (len(ACC_COLUMNS) + 2)), ""]
    r = st["recipe"]
    chosen = st.get("chosen", {})
    paper = res["schemes"]["unseen_products"]["models"]["paper"]
    backbone = f" ({st['backbone']})" if st.get("backbone") else ""
    out += [f"Percent, with 95 % bootstrap intervals over query photos ({st['bootstrap']} resamples); every row "
            f"on the same queries, searching the whole {res['schemes']['unseen_products']['split']['catalogue_images']}"
            f"-image catalogue. Input {st['input_size']} px, backbone `{st['model']}`{backbone}. "
            f"Default recipe: {r['loss'].replace('_', '-')} loss on batches of {r['P']} products x {r['K']} images "
            f"(each slot but a product's first is its catalogue image with chance {r['catalogue_share']:g}; "
            f"{r['catalogue_views']} augmented copies of each catalogue image"
            + (f", {r['photo_views']} of each photo" if r.get("photo_views") else "") + "), "
            + ("a residual head (the zero-shot embedding plus a learned correction that starts at zero)"
               if r.get("residual") else f"head {'with' if r['final_relu'] else 'without'} its final ReLU")
            + (", the output centred (the mean embedding of the training images subtracted, folded into the last "
               "bias)" if r.get("centre") else "")
            + (f", a preservation term of weight {r['preserve']:g} (the change of the cosine between images of "
               "different products from the zero-shot backbone's, squared, added to the loss)"
               if r.get("preserve") else "")
            + f", AdamW lr {r['lr']:g}, weight decay "
            f"{r['weight_decay']:g}, {r['epochs']} epochs, the best dev epoch kept"
            + (f" (settings: candidate `{chosen['candidate']}` of the study below)" if chosen else "")
            + f". Selection: {st['selection']}. Paper's recipe: {_paper_recipe(paper)}."
            + (f" `{zs}`, {CENTRED}: the backbone minus the mean embedding of the split's training images"
               " (what centring alone gives, without training)."
               if _centred_model(res["schemes"]["unseen_products"]["models"]) else ""), ""]
    pairs = []
    for scheme, role, title in SPLIT_TITLES:
        vs = res["schemes"].get(scheme, {}).get("models", {}).get("ours", {}).get("splits", {}).get(role, {})
        for key, label in PAIRED:
            if key in vs.get("vs_zero_shot", {}):
                d = vs["vs_zero_shot"][key]
                pairs.append(f"{title.lower()} {label} {100 * d['diff']:+.1f} ({100 * d['lo']:+.1f} to "
                             f"{100 * d['hi']:+.1f})")
    m = res["machine"]
    out += ["Default recipe minus the zero-shot backbone, in points, on the same queries (paired bootstrap, 95 %): "
            + "; ".join(pairs) + ".", "", _reading(res), "",
            f"Time: pooling every image's taps and {r['catalogue_views']} copies of each catalogue image "
            f"{res['pool_seconds'] / 60:.1f} min"
            + (f", {res['photo_views']} copies of every photo {res['photo_view_seconds'] / 60:.1f} min"
               if r.get("photo_views") else "")
            + f", then {res['schemes']['unseen_products']['models']['ours']['seconds'] / 60:.1f}"
            f" min to train the default recipe, on {m['cpu_count']} cores shared with other work (load average "
            f"{m['load_average_start'][0]:.1f} at the start of the run, {m['load_average_end'][0]:.1f} at its end; "
            f"{res.get('pool_load_average', 'not recorded')} while pooling).", ""]
    t = res.get("targets", {})
    if t:
        out += ["Targets: " + "; ".join(f"{k.replace('_', ' ')} {verdict(v['met'])} ("
                                        + ", ".join(f"{kk.replace('_', ' ')} {vv:.3g}" for kk, vv in v.items()
                                                    if kk != "met") + ")" for k, v in t.items()) + ".", ""]
    if res.get("study"):
        zsd = res["study_zero_shot_dev"]
        kd = st.get("kind_dev")  # older files: no kind dev, chosen on the unseen-products dev score alone
        zk = res.get("study_zero_shot_dev_kind", {})
        kind_cols = [_ci(zk[k]) for k in kd["metrics"]] if kd else []
        shown = [c for c in SHOWN_NOT_SCORED if c[1] in zsd.get(c[0], {})]  # older files: not recorded
        confirm = st.get("confirm")  # older files: one seed, no confirmation
        srows = [[f"`{zs}`, zero-shot", "-", "-", "-", *[_ci(zsd[role][k]) for role, k in STUDY_COLUMNS],
                  *(["-", *kind_cols, "-"] if kd else []), *(["-"] if confirm else []),
                  *[_ci(zsd[role][k]) for role, k, _ in shown], "-"]]
        for cand, m in res["study"].items():
            change = ", ".join(f"{k} {v}" for k, v in m["change"].items()) or "the default"
            kind = ([f"{m['dev_kind_score']:.3f}", *[_ci(m["dev_kind"][k]) for k in kd["metrics"]],
                     f"{m['study_score']:.3f}"] if kd else [])
            srows.append([f"`{cand}`" + (" (chosen)" if cand == chosen.get("candidate") else ""), change,
                          m["best_epoch"], f"{m['dev_selection_score']:.3f}",
                          *[_ci(m["dev"][role][k]) for role, k in STUDY_COLUMNS], *kind,
                          *([f"{m['study_score_mean']:.3f}" if "study_score_mean" in m else "-"] if confirm else []),
                          *[_ci(m["dev"][role][k]) for role, k, _ in shown],
                          f"{m['seconds'] + m.get('kind_seconds', 0):.0f}"])
        threads = f", trained with {st['threads']} thread(s)" if st.get("threads") else ""
        names = {"photo_to_photo_mAP": "photo->photo mAP", "photo_to_catalogue_recall@1": "photo->catalogue R@1",
                 "photo_to_catalogue_recall@5": "photo->catalogue R@5"}
        choice = ("study score = the mean of the two; the {top} best are trained again with training seeds {seeds} "
                  "(the same split and augmented copies; a seed draws the batches, dropout and proxies) and the best "
                  "mean study score over their seeds is chosen".format(top=confirm["top"],
                                                                       seeds=_and(confirm["seeds"][1:]))
                  if confirm else "the candidate with the best mean of the two scores is chosen")
        kind_text = (f"; kind-dev score = mean of {', '.join(names[k] for k in kd['metrics'])} on the "
                     f"{kd['photos']} photos of the {kd['products']} {kd['held_out']} products, held out of a second "
                     f"training run of each candidate in which {kd['never_read']} are never read either; {choice}"
                     ) if kd else ""
        seed_heads = [f"mean study score, seeds {_and(confirm['seeds'])}"] if confirm else []
        kind_heads = (["kind-dev score", *[f"dev {kd['held_out']} {names[k]}" for k in kd["metrics"]],
                       "study score"] if kd else [])
        out += ["How the settings were chosen, on dev data only (each candidate changes the default as its row "
                f"says; dev score = mean of the three unseen-products dev figures{kind_text}{threads}):", "",
                table(["candidate", "change", "kept epoch", "dev score", "dev unseen photo->photo mAP",
                       "dev unseen photo->catalogue R@5", "dev seen photo->catalogue R@1", *kind_heads,
                       *seed_heads, *[head for _, _, head in shown], "train s"],
                      srows, "llrrrrr" + "r" * (len(kind_heads) + len(seed_heads) + len(shown)) + "r"), ""]
    out.append(source([name], command))
    return "\n".join(out)


CENTRED = "zero-shot, centred"  # the kind bench/accuracy.py gives the centred backbone's row


def _centred_model(models: dict) -> dict:
    """The centred backbone's entry among a scheme's models ({} in files without one)."""
    return next((m for m in models.values() if m["kind"] == CENTRED), {})


def _where(vs: dict) -> str:
    """Paired intervals ``{metric: {"lo", "hi", ...}}`` of the PAIRED metrics in words: clearly above, level
    (the interval holds zero) or clearly below."""
    level = "level (the interval holds zero)"
    where: dict[str, list[str]] = {"clearly above": [], level: [], "clearly below": []}
    for key, label in PAIRED:
        d = vs.get(key)
        if d:
            where["clearly above" if d["lo"] > 0 else "clearly below" if d["hi"] < 0 else level].append(label)
    return "; ".join(f"{w} on {', '.join(labels)}" for w, labels in where.items() if labels)


def _reading(res: dict) -> str:
    """The paired intervals in words (clearly above, level, clearly below the backbone, and the centred backbone
    where the file has it), the same-class margin beside theirs, which study candidates kept the never-seen kind
    above the backbone, and how far the chosen candidate was ahead."""
    zs = res["settings"]["zero_shot"]
    lines = ["Read plainly, the default recipe against the zero-shot backbone, on the same queries:"]
    for scheme, role, title in SPLIT_TITLES:
        models = res["schemes"].get(scheme, {}).get("models", {})
        if role not in models.get("ours", {}).get("splits", {}):
            continue
        ours, base = models["ours"]["splits"][role], models[zs]["splits"][role]
        centred = _centred_model(models).get("splits", {}).get(role)
        line = (f"- {title}: {_where(ours.get('vs_zero_shot', {}))}. Same-class minus other-class cosine "
                f"{ours['spread']['margin']:.3f} (the backbone's {base['spread']['margin']:.3f}"
                + (f", the centred backbone's {centred['spread']['margin']:.3f}" if centred else "") + ").")
        if "vs_centred_zero_shot" in ours:
            line += f" Against the centred backbone: {_where(ours['vs_centred_zero_shot'])}."
        lines.append(line)
    kd, zk = res["settings"].get("kind_dev"), res.get("study_zero_shot_dev_kind")
    if kd and zk and res.get("study"):
        floor = sum(zk[k]["value"] for k in kd["metrics"]) / len(kd["metrics"])
        above = [f"`{c}`" for c, m in res["study"].items() if m["dev_kind_score"] > floor]
        below = [f"`{c}`" for c, m in res["study"].items() if m["dev_kind_score"] <= floor]
        lines.append(f"- Study, kind dev ({kd['held_out']} never trained on): above the zero-shot backbone's score "
                     f"({floor:.3f}): {', '.join(above) or 'none'}; at or below it: {', '.join(below) or 'none'}.")
    # the choice: the best mean over the confirmation seeds (older files: the one seed's study score)
    score = lambda m: m.get("study_score_mean", m.get("study_score", float("-inf")))  # noqa: E731
    ranked = sorted(res.get("study", {}).items(), key=lambda kv: -score(kv[1]))
    if len(ranked) > 1 and "study_score" in ranked[0][1]:
        lines.append(_choice(*ranked[0], *ranked[1]))
    return "\n".join(lines)


def _choice(first: str, a: dict, second: str, b: dict) -> str:
    """The study's chosen candidate against its runner-up, seed by seed where both trained with several."""
    if "seeds" not in a or "seeds" not in b:
        return (f"- Study: `{first}` chosen with study score {a['study_score']:.3f}, the runner-up `{second}` "
                f"{b['study_score']:.3f} (a difference of {a['study_score'] - b['study_score']:.3f}).")
    seeds = sorted(a["seeds"], key=int)
    mine, theirs = [a["seeds"][k]["study_score"] for k in seeds], [b["seeds"][k]["study_score"] for k in seeds]
    ahead = sum(x > y for x, y in zip(mine, theirs))
    return (f"- Study: `{first}` chosen with mean study score {a['study_score_mean']:.3f} over training seeds "
            f"{_and(seeds)}, the runner-up `{second}` {b['study_score_mean']:.3f}: ahead on {ahead} of {len(seeds)} "
            "seeds (seed by seed " + ", ".join(f"{x:.3f} against {y:.3f}" for x, y in zip(mine, theirs))
            + f"). The chosen recipe's own score moves from {min(mine):.3f} to {max(mine):.3f} with the seed alone, "
            "which is why the choice is made on the mean over seeds.")


def _and(values) -> str:
    """``[0, 1, 2]`` -> ``"0, 1 and 2"``."""
    values = [str(v) for v in values]
    return ", ".join(values[:-1]) + " and " + values[-1] if len(values) > 1 else "".join(values)


def _paper_recipe(paper: dict) -> str:
    """The paper-recipe row's settings as its JSON records them (older files record less)."""
    rec = paper.get("recipe", {})
    parts = []
    if "triplets_per_photo" in rec:
        parts.append(f"{rec['triplets_per_photo']} triplets per photo ({rec['hard_ratio']:.0%} hard negatives, "
                     f"{rec['in_class_ratio']:.0%} of the others in-class)")
    if "loss" in rec:
        parts.append(f"{rec['loss'].replace('_', '-')} loss")
    if "optimizer" in rec:
        parts.append(f"{rec['optimizer']} lr {rec['lr']:g}, batch {rec['batch_size']}")
    if "augment" in rec:
        parts.append("augmented photos" if rec["augment"] else "no augmentation")
    parts.append(f"{paper['epochs']} epochs")
    return ", ".join(parts) + f"; kept: {paper['selected_by']}"


STUDY_COLUMNS = (("dev_unseen", "photo_to_photo_mAP"), ("dev_unseen", "photo_to_catalogue_recall@5"),
                 ("dev_seen", "photo_to_catalogue_recall@1"))
# columns of the study table that no score reads: (role, metric, header); the dev view of the seen in-class target
SHOWN_NOT_SCORED = (("dev_seen", "triplet_accuracy_in_class", "dev seen in-class triplets (shown, not scored)"),)


def serving_method(data: dict) -> str:
    st = data["settings"]
    if st.get("method") != "pinned":
        return ("Unpinned: the server, the load generator and the in-process baseline shared every core, so "
                "the load generator's work is counted against the server.")
    cores = lambda cpus: ("core " if len(cpus) == 1 else "cores ") + ", ".join(map(str, cpus))  # noqa: E731
    points = [r for m in data["models"].values() for r in m["triton"]]
    busy = max(r["client_cores_busy"] for r in points)
    cost = max(r["client_cpu_ms_per_request"] for r in points)
    return (f"Pinned: the server and the in-process baseline run on {cores(st['server_cpus'])} with "
            f"{st['threads']} torch thread(s) each, the load generator on {cores(st['client_cpus'])}; it spent at "
            f"most {cost:.1f} ms of CPU per request and kept its core at most {busy:.0%} busy"
            + (", so it never held the server back." if busy < 0.5 else ": it may have held the server back."))


def render_serving() -> str:
    data = load("serving.json")
    rows = []
    for key, m in data["models"].items():
        best = m["in_process_best"]
        rows.append([f"`{m['variant']}` ({m['input_size']} px)", "in-process PyTorch", "-", best["batch"],
                     f"{best['img_per_s']:.1f}", f"{best['latency_ms']:.0f}", "-"])
        for r in m["triton"]:  # 16 clients; one client shows the queue policy's stalls (docs/serving.md)
            if r["concurrency"] == 16 or (r["concurrency"] == 1 and r["protocol"] == "http"
                                          and r["batching"] != "none"):
                rows.append(["", f"Triton {r['protocol']}, batching {r['batching']}", r["concurrency"],
                             f"{r['avg_batch']:.1f}", f"{r['img_per_s']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}"])
    targets = []
    for key, checks in data["targets"].items():
        for name, (value, met) in checks.items():
            targets.append(f"- `{key}` {name}: {value:.2f}, {verdict(met)}")
    load_start, load_end = data["machine"]["load_avg_start"][0], data["machine"]["load_avg_end"][0]
    return "\n".join([
        table(["model", "path", "clients", "batch", "img/s", "p50 (ms)", "p99 (ms)"], rows, "llrrrrr"),
        "",
        f"{serving_method(data)} Load average {load_start:.2f} at the start, {load_end:.2f} at the end.",
        "",
        "Targets (ratios measured in the same run):",
        *targets,
        "",
        source(["serving.json"], "python bench/serving.py"),
    ])


def render_kernel() -> str:
    data = load("kernel.json")
    fused = {(r["n"], r["layout"], r["dtype"], r["mode"]): r for r in data["rows"] if r["variant"] == "fused"}
    compiled = {(r["n"], r["layout"], r["dtype"], r["mode"]): r for r in data["rows"] if r["variant"] == "compiled"}
    rows = []
    for (n, layout, dtype, mode), r in fused.items():
        if mode != "forward":
            continue
        back = fused[(n, layout, dtype, "forward+backward")]
        comp = compiled.get((n, layout, dtype, mode))
        rows.append([n, layout, dtype, f"{r['ms']:.3f}", f"{r['sum_read_gbps']:.2f}", f"{r['speedup_vs_eager']:.2f}x",
                     f"{r['speedup_vs_eager'] / comp['speedup_vs_eager']:.2f}x" if comp else "-",
                     f"{back['speedup_vs_eager']:.2f}x"])
    targets = [f"- {name}: worst {t['worst']:.2f} ({t['worst_config']}), {verdict(t['met'])}"
               for name, t in data["targets"].items()]
    return "\n".join([
        table(["N", "layout", "dtype", "forward (ms)", "of read roof", "vs eager", "vs torch.compile",
               "fwd+bwd vs eager"], rows, "rllrrrrr"),
        "",
        f"{len(data['taps'])} maps of C x H x W = {', '.join('x'.join(map(str, t)) for t in data['taps'])}"
        f"{', L2-normalised' if data['l2_normalize'] else ''}, on the {data['settings']['device'].upper()} with "
        f"{data['settings']['threads']} thread{'s' if data['settings']['threads'] != 1 else ''}; the read "
        "roof is `x.sum()` over the same bytes, measured in the same run.",
        *targets,
        "",
        source(["kernel.json"], "python bench/kernel.py"),
    ])


# One file per embedding size, each measuring the shipped mildnet.index at 100k and 1M against its own flat search.
RETRIEVAL_FILES = {
    "retrieval.json": "python bench/retrieval.py --sizes 100000,1000000 --dims 512 --kinds ivfpq,auto",
    "retrieval_1024.json": "python bench/retrieval.py --sizes 100000,1000000 --dims 1024 --kinds ivfpq,auto "
                           "--out bench/results/retrieval_1024.json",
}


def _retrieval(name: str) -> dict | None:
    """A retrieval JSON written by the current bench (it measures the shipped index), else None."""
    path = RESULTS / name
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data if "load_average" in data and data.get("measures", "").startswith("mildnet.index") else None


def _params(params: dict) -> str:
    """A row's settings as ``k=v, ...`` (the read consistency of Milvus rows is said once, beside the table)."""
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != "consistency")


def _by_size(rows: list[dict]) -> dict[tuple[int, int], list[dict]]:
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["n"], r["dim"]), []).append(r)
    return groups


def _index_row(r: dict) -> list:
    kind = r["index"] if r["index"] == r["built_kind"] else f"{r['index']} ({r['built_kind']})"
    return [f"{r['n']:,} x {r['dim']}", kind, _params(r["params"]) or "shipped defaults", f"{r['recall@10']:.3f}",
            f"{r['qps']:,.0f}", f"{r['latency_ms']:.2f}", f"{r['speedup_vs_flat']:.1f}x", f"{r['build_s']:.0f}",
            f"{r['index_mb']:,.0f}"]


def render_index() -> str:
    out, rows, notes = [], [], []
    for name, command in RETRIEVAL_FILES.items():
        data = _retrieval(name)
        if data is None:
            notes.append(f"- `bench/results/{name}`: not yet measured on the shipped index; run `{command}` on a "
                         "quiet machine.")
            continue
        target, st = data["target"], data["settings"]
        for (n, dim), group in sorted(_by_size(data["rows"]).items()):
            flat = [r for r in group if r["index"] == "flat"]
            if not flat:  # a row is shown only beside the baseline it was divided by
                continue
            ok = lambda x: x["recall@10"] >= target["recall@10"]  # noqa: E731
            shown = {}
            for r in group:  # per kind: the fastest setting that reaches the recall target, else the most accurate
                key = lambda x: (ok(x), x["qps"] if ok(x) else x["recall@10"])  # noqa: E731
                if r["index"] not in shown or key(r) > key(shown[r["index"]]):
                    shown[r["index"]] = r
            rows += [_index_row(r) for r in shown.values()]
        la = data["load_average"]
        notes.append(f"- `bench/results/{name}` ({st['queries']:,} queries, {st['threads']} FAISS threads, warm-up "
                     f"then best of {st['repeats']}; load average {la['before'][0]:.2f} before, {la['after'][0]:.2f} "
                     f"after{'; **noisy**: started above ' + str(la['max_load']) if data['noisy'] else ''}):")
        for v in data["verdicts"]:
            a, b = v["auto"], v["best"]
            auto = (f"`auto` built {a['built_kind']}, recall@10 {a['recall@10']:.3f} at {a['speedup_vs_flat']:.1f}x "
                    f"flat: {verdict(v['auto_target_met'])}") if a else "`auto` not measured"
            best = (f"best {b['index']} ({_params(b['params'])}) at recall@10 "
                    f"{b['recall@10']:.3f}, {b['speedup_vs_flat']:.1f}x") if b else "no row reached the recall target"
            notes.append(f"  {v['n']:,} x {v['dim']}: {auto}; {best}.")
        out.append(source([name], command))
    target = {"recall@10": 0.95, "speedup_vs_flat": 50.0}
    for name in RETRIEVAL_FILES:
        data = _retrieval(name)
        if data:
            target = data["target"]
    table_text = table(["vectors", "index", "parameters", "recall@10", "queries/s", "latency (ms)", "vs flat",
                        "build (s)", "MB"], rows, "llrrrrrrr") if rows else "_No shipped-index measurement yet._"
    return "\n".join([
        table_text,
        "",
        "Every row is `mildnet.index.create_index(kind=...)`, the code `similar` and `mildnet index` run; per kind "
        f"the fastest setting with recall@10 >= {target['recall@10']} (else the most accurate one; every setting "
        "tried is in the JSON). \"vs flat\" divides by the exact search of the same file, size and dimension, timed "
        f"the same way. Target: `auto` reaches recall@10 >= {target['recall@10']} at >= "
        f"{target['speedup_vs_flat']:.0f}x the exact search's queries/s at 1M vectors. Synthetic clustered unit "
        "vectors (see bench/retrieval.py).",
        *notes,
        *(["", *out] if out else []),
    ])


# The Milvus standalone server beside the shipped FAISS index, each file one run on the same vectors and queries.
# A size measured in two files is shown from the first one listed (the 100k rerun: quieter than the long run's).
_MILVUS_RUN = "python bench/retrieval.py --dims 1024 --kinds auto --milvus --nprobe 8,32 --sizes"
MILVUS_FILES = {
    "retrieval_milvus_100k_1024.json": f"{_MILVUS_RUN} 100000 --out bench/results/retrieval_milvus_100k_1024.json",
    "retrieval_milvus_1024.json": f"{_MILVUS_RUN} 100000,1000000 --out bench/results/retrieval_milvus_1024.json",
}


def _engine_row(r: dict) -> list:
    """:func:`_index_row` with the engine named and what its memory figure covers."""
    server = r["index"].startswith("milvus-")
    vectors, *cells, mb = _index_row(r)
    return [vectors, "Milvus server" if server else "FAISS in-process", *cells,
            f"{mb} ({'server' if server else 'index'})"]


def _milvus_summary(group: list[dict], recall: float) -> str:
    """One size: the shipped FAISS choice against the fastest Milvus setting that reaches the recall target."""
    auto = next((r for r in group if r["index"] == "auto"), None)
    milvus = [r for r in group if r["index"].startswith("milvus-")]
    good = [r for r in milvus if r["recall@10"] >= recall]
    best = max(good, key=lambda r: r["qps"]) if good else max(milvus, key=lambda r: r["recall@10"], default=None)
    if auto is None or best is None:
        return ""
    return (f"- {auto['n']:,} x {auto['dim']}: FAISS `auto` ({auto['built_kind']}) recall@10 {auto['recall@10']:.3f}, "
            f"{auto['qps']:,.0f} queries/s, {auto['latency_ms']:.2f} ms per single query, built in "
            f"{auto['build_s']:.0f} s; Milvus {'fastest at' if good else 'nothing reached'} recall@10 >= {recall}"
            f"{'' if good else ', most accurate'}: {best['index']} ({_params(best['params'])}) recall@10 "
            f"{best['recall@10']:.3f}, "
            f"{best['qps']:,.0f} queries/s, {best['latency_ms']:.2f} ms per single query, built in "
            f"{best['build_s']:.0f} s (load average {auto['load_1m_before']} when this size started).")


def _milvus_run(data: dict) -> str:
    st, la = data["settings"], data["load_average"]
    return (f"{st['queries']:,} queries, the same vectors and queries for both engines; the Milvus server "
            f"({data['machine'].get('milvus_server', 'version not recorded')}) started by the benchmark on 127.0.0.1, "
            f"queried through the shipped `mildnet.index` Milvus backend at `{st['milvus_consistency']}` consistency; "
            f"FAISS with {st['threads']} threads; warm-up then best of {st['repeats']} batched calls for every row; "
            f"load average {la['before'][0]:.2f} before, {la['after'][0]:.2f} after"
            + (f"; **noisy**: started above {la['max_load']}" if data["noisy"] else "")
            + ("" if data["complete"] else "; **partial**: the run stopped before its last size") + ".")


def render_milvus() -> str:
    rows, notes, summaries, sources, shown = [], [], [], [], set()
    for name, command in MILVUS_FILES.items():
        data = _retrieval(name)
        if data is None or not any(r["index"].startswith("milvus-") for r in data["rows"]):
            notes.append(f"- `bench/results/{name}`: not yet measured against a Milvus server; run `{command}` on a "
                         "quiet machine.")
            continue
        groups = _by_size(data["rows"])
        later = [f"{n:,} x {dim}" for n, dim in groups if (n, dim) in shown]
        for key, group in groups.items():
            if key not in shown:
                shown.add(key)
                rows += [_engine_row(r) for r in group]
                summaries.append(_milvus_summary(group, data["target"]["recall@10"]))
        notes.append(f"- `bench/results/{name}`: {_milvus_run(data)}"
                     + (f" Its {', '.join(later)} rows are not shown: that size is shown from a file listed above it."
                        if later else ""))
        sources.append(source([name], command))
    table_text = table(["vectors", "engine", "index", "parameters", "recall@10", "queries/s", "latency (ms)",
                        "vs flat", "build (s)", "memory (MB)"], rows, "llllrrrrrr") if rows else \
        "_No Milvus server measurement yet._"
    summaries = [line for line in summaries if line]
    return "\n".join([
        table_text,
        "",
        "\"vs flat\" divides by FAISS's exact search of the same size in the same run. Build: FAISS, one `add` of "
        "every item; Milvus, the insert through gRPC, the flush and the server's index build until every row is "
        "indexed, then the load. Memory: FAISS, the growth of the process over the build; Milvus, the resident set "
        "of the whole server (etcd, coordinators, loaded segments) after loading, not the index alone. Latency: one "
        "query per call, so the Milvus figure includes the gRPC round trip. Each file is one run:",
        *notes,
        *(["", "Per size, the shipped FAISS choice against Milvus:", "", *summaries] if summaries else []),
        "",
        *sources,
    ])


def render_headline() -> str:
    """The README's one or two numbers: what the demo's short training reaches on held-out photos."""
    if not (RESULTS / "demo.json").exists():
        return "_No demo run recorded yet: `make demo-record` writes `bench/results/demo.json`._"
    s = load("demo.json")
    m = s["model"]
    hits1, hits5 = round(s["top1"] * s["queries"]), round(s["top5"] * s["queries"])
    return (f"The demo (`{m['variant']}`, {m['epochs']} epochs at {m['input_size']} px) finds the right product "
            f"first for {hits1} of {s['queries']} query photos and in the top 5 for {hits5}, among "
            f"{s['catalogue_items']} catalogue items, in {s['seconds'] / 60:.1f} min from scratch "
            "([all results](docs/results.md)). " + source(["demo.json"], "make demo-record"))


def render_soak() -> str:
    data = load("soak.json")
    s, cfg = data["summary"], data["settings"]
    return "\n".join([
        table(["duration", "rate", "requests", "served", "failures", "p50 (ms)", "p99 (ms)", "memory growth"],
              [[f"{cfg['duration'] / 60:.0f} min", f"{cfg['rate']:g}/s", s["requests"], s["served"], s["failures"],
                f"{s['p50_ms']:.0f}", f"{s['p99_ms']:.0f}", f"{100 * s['rss_growth_after_warmup']:+.1f} %"]]),
        "",
        f"Targets: {s['targets']['failures']} failures ({verdict(s['met']['failures'])}), memory growth after "
        f"warm-up below {pct(s['targets']['rss_growth_after_warmup'])} ({verdict(s['met']['rss_growth'])}).",
        "",
        source(["soak.json"], "python bench/soak.py"),
    ])


def render_demo() -> str:
    if not (RESULTS / "demo.json").exists():
        return "_No demo run recorded yet: `make demo-record` writes `bench/results/demo.json`._"
    s = load("demo.json")
    lo = s["locust"]
    times = [[f"`{model}`", t["requests"], f"{t['request_ms']:.1f}", f"{t['queue_ms']:.1f}",
              f"{t['compute_input_ms'] + t['compute_output_ms']:.1f}", f"{t['compute_infer_ms']:.1f}",
              f"{t['avg_batch']:.1f}"]
             for model, t in s["time_per_request"].items() if t.get("requests")]
    m = s["model"]
    model = f"`{m.get('variant', m['model_version'].rsplit('-', 1)[0])}`, {m['input_size']} px, {m['epochs']} ep."
    return "\n".join([
        table(["model", "catalogue", "queries", "top-1", "top-5", "load test", "requests/s", "failures", "p50 (ms)",
               "p95 (ms)", "p99 (ms)", "demo time"],
              [[model, s["catalogue_items"], s["queries"], pct(s["top1"]), pct(s["top5"]),
                f"{lo['seconds']} s, {lo['users']} users", f"{lo['rps']:.1f}", lo["failures"],
                f"{lo['p50_ms']:.0f}", f"{lo['p95_ms']:.0f}", f"{lo['p99_ms']:.0f}", f"{s['seconds'] / 60:.1f} min"]],
              "l" + "r" * 11),
        "",
        "Where a request's time went inside Triton during the load test (ms per request, from Triton's metrics; "
        "see [serving.md](serving.md#where-the-time-goes-per-request)):",
        "",
        table(["model", "requests", "in Triton", "queue", "input + output", "compute", "batch"], times),
        "",
        source(["demo.json"], "make demo-record"),
    ])


def render_ui() -> str:
    s = load("ui.json")
    rows = [[pt["users"], f"{pt['triton']['p50_ms']:.1f}", f"{pt['page']['p50_ms']:.1f}", f"{pt['added_p50_ms']:.1f}",
             f"{pt['triton']['p99_ms']:.1f}", f"{pt['page']['p99_ms']:.1f}", f"{pt['added_p99_ms']:.1f}"]
            for pt in s["points"]]
    return "\n".join([
        table(["users", "Triton direct p50 (ms)", "page p50 (ms)", "web layer p50 (ms)", "Triton direct p99 (ms)",
               "page p99 (ms)", "web layer p99 (ms)"], rows),
        "",
        f"`{s['model']}` at {s['input_size']} px, {s['catalogue_items']} catalogue items, k = {s['k']}, a "
        f"{s['query_bytes'] / 1024:.0f} KiB photo; load average {s['machine']['load_avg_end'][0]:.1f} on "
        f"{s['machine']['cpus']} CPUs, {s['points'][0]['page']['n']} and {s['points'][-1]['page']['n']} page requests.",
        "",
        source(["ui.json"], "python bench/ui.py"),
    ])


RENDERERS = {
    "params": render_params, "zoo": render_zoo, "accuracy": render_accuracy, "serving": render_serving,
    "kernel": render_kernel, "index": render_index, "milvus": render_milvus, "soak": render_soak,
    "demo": render_demo, "ui": render_ui,
    "headline": render_headline,
}


def render(text: str) -> str:
    """``text`` with every generated block rendered anew from the JSON files."""
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"README block '{name}' has no renderer in bench/report.py ({', '.join(RENDERERS)})")
        return f"{match.group(1)}{RENDERERS[name]()}\n{match.group(4)}"
    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that the documents are up to date")
    ap.add_argument("--docs", type=Path, nargs="+", default=list(DOCS), help="documents with generated blocks")
    args = ap.parse_args(argv)
    stale = []
    for doc in args.docs:
        old = doc.read_text()
        new = render(old)
        if new == old:
            print(f"{doc}: {len(BLOCK.findall(new))} generated blocks up to date")
        elif args.check:
            stale.append(doc)
        else:
            atomic_write_text(doc, new)
            print(f"{doc}: {len(BLOCK.findall(new))} generated blocks updated")
    if stale:
        print(f"{', '.join(map(str, stale))} out of date with bench/results: run python bench/report.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
