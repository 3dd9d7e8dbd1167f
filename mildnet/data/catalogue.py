"""Catalogues: the list of images a user brings (path, item, category, domain, split), and its adapters.

A catalogue row says *what* an image shows, never how to train on it: triplets are made from it by
:mod:`mildnet.data.triplets`. One :class:`CatalogueItem` per image.

* ``item_id``: the product (fine class). Several photos of one product share it.
* ``category``: the coarse class (in-class negatives share it, out-of-class ones do not).
* ``domain``: ``"street"`` (a user's photo) or ``"shop"`` (a catalogue image).
* ``split``: ``"train"`` / ``"val"`` / ``"test"``, or ``None`` for images every split may use (a shop catalogue).

Formats read by :func:`load_catalogue` (auto-detected):

* CSV / TSV with a header (``path,item_id,category[,domain][,split][,extra...]``; extra columns -> metadata),
* JSONL (one object per line, same keys; a ``metadata`` object is merged into metadata),
* a folder-per-class tree (``root/<class>/*.jpg`` or ``root/<category>/<item>/*.jpg``, optional
  ``train|val|test`` top level),
* the Grocery Store dataset layout (a folder holding ``dataset/train.txt``),
* the official MILDNet / Street2Shop triplet CSVs (``q,p,n`` paths),
* Fashion-MNIST IDX files (``*-images-idx3-ubyte[.gz]`` + labels) via :func:`fashion_mnist_catalogue`.

Every bad row raises :class:`CatalogueError` naming the file and line. A row whose *image* is unreadable is
not an error here (decoding thousands of files just to list them is slow): :func:`check_images` decodes them,
reports the bad ones and drops them, and the training cache does the same.
"""
from __future__ import annotations

import csv
import difflib
import gzip
import json
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import MildnetError
from ..fileio import atomic_open
from ..imageio import ImageDecodeError, decode_image

__all__ = [
    "CatalogueError", "CatalogueItem", "load_catalogue", "grocery_catalogue", "folder_catalogue",
    "triplet_csv_catalogue", "read_triplet_csv", "fashion_mnist_catalogue", "read_idx", "check_images",
    "write_catalogue", "index_entries", "IMAGE_EXTENSIONS", "DOMAINS",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DOMAINS = ("street", "shop")
SPLIT_NAMES = ("train", "val", "test")
REQUIRED_COLUMNS = ("path", "item_id", "category")
OPTIONAL_COLUMNS = ("domain", "split")
KNOWN_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
# Common spellings accepted for the known columns (lower-cased header -> canonical name).
COLUMN_ALIASES = {"image": "path", "image_path": "path", "file": "path", "filename": "path",
                  "item": "item_id", "product_id": "item_id", "label": "item_id",
                  "class": "category", "coarse_class": "category"}
TRIPLET_HEADERS = ({"q", "p", "n"}, {"query", "positive", "negative"}, {"anchor", "positive", "negative"})


class CatalogueError(MildnetError, ValueError):
    """A catalogue (or one of its rows) cannot be used; the message names the file, the row and why."""


@dataclass(frozen=True)
class CatalogueItem:
    """One image of a catalogue. ``path`` is absolute after loading."""

    path: Path
    item_id: str
    category: str
    domain: str = "shop"
    split: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    row: int | None = field(default=None, compare=False)  # source line, for error messages

    def to_row(self, root: Path | None = None) -> dict[str, Any]:
        """Flat dict for CSV/JSONL output; ``path`` relative to ``root`` when it lies under it."""
        path = self.path
        if root is not None:
            try:
                path = self.path.relative_to(root)
            except ValueError:
                pass
        return {"path": str(path), "item_id": self.item_id, "category": self.category,
                "domain": self.domain, "split": self.split or "", **self.metadata}


# --------------------------------------------------------------------------------------------- dispatch
def load_catalogue(source: str | os.PathLike, root: str | os.PathLike | None = None,
                   allow_outside_root: bool = False, *, unique_ids: bool = False,
                   check_files: bool = True, skipped: list[tuple[str, str]] | None = None) -> list[CatalogueItem]:
    """Read a catalogue from a CSV/TSV, JSONL, triplet CSV, Grocery folder or folder-per-class tree.

    Args:
        source: the file or folder.
        root: folder that relative image paths are resolved against (default: the file's folder, or the
            folder itself for trees). Paths that leave it (``../``, absolute) are refused unless
            ``allow_outside_root``.
        unique_ids: require every row to have its own ``item_id`` (a gallery of one image per product).
        check_files: refuse rows whose image file does not exist.
        skipped: for a folder tree, receives ``(relative path, reason)`` for every file not made an item.
    """
    source = Path(source)
    if not source.exists():
        raise CatalogueError(f"{source}: no such catalogue file or folder")
    if source.is_dir():
        if (source / "dataset" / "train.txt").is_file() or (source / "train.txt").is_file() and \
                (source / "classes.csv").is_file():
            items = grocery_catalogue(source)
        else:
            items = folder_catalogue(source, skipped)
    else:
        suffix = "".join(source.suffixes[-2:]).lower() if source.suffix == ".gz" else source.suffix.lower()
        if suffix in (".jsonl", ".ndjson", ".json"):
            items = _read_jsonl(source, root, allow_outside_root, check_files)
        elif suffix in (".csv", ".tsv", ".txt"):
            if _looks_like_triplets(source):
                items = triplet_csv_catalogue(source, root, allow_outside_root=allow_outside_root,
                                              check_files=check_files)
            else:
                items = _read_csv(source, root, allow_outside_root, check_files)
        else:
            raise CatalogueError(f"{source}: unknown catalogue format {source.suffix!r} "
                                 "(expected .csv, .tsv, .jsonl or a folder)")
    if not items:
        raise CatalogueError(f"{source}: the catalogue has no images")
    _check_duplicates(items, source, unique_ids)
    return items


def index_entries(source: str | os.PathLike, root: str | os.PathLike | None = None,
                  allow_outside_root: bool = False, skipped: list[tuple[str, str]] | None = None
                  ) -> list[tuple[str, Path, dict[str, Any]]]:
    """``(index id, image path, metadata)`` per catalogue image: what a search index stores (client/index.py).

    Rows are read (and paths checked against the root) by :func:`load_catalogue`. The id is the row's ``id``
    column when it has one, else the image path relative to the catalogue root (absolute outside it). The
    metadata is every extra column plus ``item_id``, ``category``, ``domain``, ``path`` (and ``split``);
    ``path`` is relative to the catalogue root (a served hit must not tell clients the server's file system),
    absolute only for an image outside it (``allow_outside_root``).
    Two images with one id raise :class:`CatalogueError` naming both. ``skipped``: see :func:`load_catalogue`.
    """
    items = load_catalogue(source, root=root, allow_outside_root=allow_outside_root, skipped=skipped)
    source = Path(source)
    base = (Path(root) if root is not None else source if source.is_dir() else source.parent).resolve()
    out, seen = [], {}
    for item in items:
        path = Path(item.path).resolve()
        extra = dict(item.metadata or {})
        rel = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()
        item_id = str(extra.pop("id", "")) or rel
        if item_id in seen:
            raise CatalogueError(f"catalogue {source}: id {item_id!r} used by two images ({seen[item_id]} and "
                                 f"{path})")
        seen[item_id] = path
        meta = {**extra, "item_id": item.item_id, "category": item.category, "domain": item.domain,
                "path": rel}
        if item.split is not None:
            meta["split"] = item.split
        out.append((item_id, path, meta))
    return out


def _check_duplicates(items: Sequence[CatalogueItem], source: Path, unique_ids: bool) -> None:
    seen_path: dict[Path, int] = {}
    seen_id: dict[str, int] = {}
    for i, it in enumerate(items):
        row = it.row or i + 1
        if it.path in seen_path:
            raise CatalogueError(f"{source}: row {row}: image {it.path} is listed twice "
                                 f"(first at row {seen_path[it.path]})")
        seen_path[it.path] = row
        if unique_ids:
            if it.item_id in seen_id:
                raise CatalogueError(f"{source}: row {row}: duplicate item_id {it.item_id!r} "
                                     f"(first at row {seen_id[it.item_id]}); this catalogue needs unique ids")
            seen_id[it.item_id] = row


# --------------------------------------------------------------------------------------------- rows
def _resolve_path(raw: str, root: Path, allow_outside_root: bool, where: str, check_files: bool) -> Path:
    raw = (raw or "").strip()
    if not raw:
        raise CatalogueError(f"{where}: empty image path")
    p = Path(raw)
    resolved = (root / p).resolve()  # an absolute p replaces root; one under the root is harmless
    if not allow_outside_root:
        try:
            resolved.relative_to(root.resolve())
        except ValueError:
            raise CatalogueError(f"{where}: image path {raw!r} leaves the catalogue root {root} "
                                 "(pass allow_outside_root=True / --allow-outside-root to permit it)") from None
    if check_files and not resolved.is_file():
        raise CatalogueError(f"{where}: image file not found: {resolved}")
    return resolved


def _make_item(row: dict[str, Any], root: Path, allow_outside_root: bool, where: str,
               check_files: bool, row_number: int) -> CatalogueItem:
    path = _resolve_path(str(row.get("path") or ""), root, allow_outside_root, where, check_files)
    item_id = str(row.get("item_id") or "").strip()
    category = str(row.get("category") or "").strip()
    if not item_id:
        raise CatalogueError(f"{where}: empty item_id")
    if not category:
        raise CatalogueError(f"{where}: empty category")
    domain = str(row.get("domain") or "shop").strip().lower()
    if domain not in DOMAINS:
        raise CatalogueError(f"{where}: domain must be one of {DOMAINS}, got {row.get('domain')!r}")
    split = row.get("split")
    split = str(split).strip() or None if split is not None else None
    metadata = {k: v for k, v in row.items() if k not in KNOWN_COLUMNS and k != "metadata"}
    if isinstance(row.get("metadata"), dict):
        metadata.update(row["metadata"])
    elif row.get("metadata") not in (None, ""):
        raise CatalogueError(f"{where}: 'metadata' must be a JSON object, got {type(row['metadata']).__name__}")
    return CatalogueItem(path, item_id, category, domain, split, metadata, row_number)


def _canonical_columns(columns: Iterable[str], where: str) -> dict[str, str]:
    """Map header names to canonical ones; refuse empty names, duplicates and likely typos of known columns."""
    mapping: dict[str, str] = {}
    for col in columns:
        name = (col or "").strip()
        if not name:
            raise CatalogueError(f"{where}: a column has an empty name")
        canon = COLUMN_ALIASES.get(name.lower(), name.lower() if name.lower() in KNOWN_COLUMNS else name)
        if canon in mapping.values():
            raise CatalogueError(f"{where}: column {name!r} appears twice (as {canon!r})")
        mapping[col] = canon
    present = set(mapping.values())
    for col, canon in mapping.items():
        if canon in KNOWN_COLUMNS:
            continue
        close = difflib.get_close_matches(canon.lower(), [k for k in KNOWN_COLUMNS if k not in present], n=1,
                                          cutoff=0.75)
        if close:
            raise CatalogueError(f"{where}: unknown column {col!r}: did you mean {close[0]!r}? "
                                 f"(known columns: {', '.join(KNOWN_COLUMNS)}; others become metadata)")
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise CatalogueError(f"{where}: missing column(s) {missing}; a catalogue needs {list(REQUIRED_COLUMNS)} "
                             f"(optional: {list(OPTIONAL_COLUMNS)}), got {list(columns)}")
    return mapping


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_csv(path: Path, root, allow_outside_root: bool, check_files: bool) -> list[CatalogueItem]:
    root = Path(root) if root is not None else path.parent
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    items = []
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise CatalogueError(f"{path}: empty file")
        mapping = _canonical_columns(header, f"{path}: line 1 (header)")
        names = [mapping[h] for h in header]
        for values in reader:
            line = reader.line_num
            if not values or all(not v.strip() for v in values):
                continue
            where = f"{path}: line {line}"
            if len(values) != len(names):
                raise CatalogueError(f"{where}: {len(values)} fields, the header has {len(names)}")
            items.append(_make_item(dict(zip(names, values)), root, allow_outside_root, where, check_files, line))
    return items


def _read_jsonl(path: Path, root, allow_outside_root: bool, check_files: bool) -> list[CatalogueItem]:
    root = Path(root) if root is not None else path.parent
    items = []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CatalogueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise CatalogueError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
            mapping = _canonical_columns(obj.keys(), where)
            items.append(_make_item({mapping[k]: v for k, v in obj.items()}, root, allow_outside_root, where,
                                    check_files, line_no))
    return items


def write_catalogue(items: Sequence[CatalogueItem], path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Write ``items`` as a CSV (or JSONL by suffix) catalogue, atomically; paths relative to ``root``."""
    path = Path(path)
    root = Path(root).resolve() if root is not None else path.parent.resolve()
    rows = [it.to_row(root) for it in items]
    with atomic_open(path, "w", what="catalogue", encoding="utf-8", newline="") as f:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")
        else:
            extra = sorted({k for r in rows for k in r} - set(KNOWN_COLUMNS))
            writer = csv.DictWriter(f, fieldnames=list(KNOWN_COLUMNS) + extra)
            writer.writeheader()
            writer.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------- Grocery
def grocery_catalogue(root: str | os.PathLike, split: str | None = None, *,
                      include_iconic: bool = True) -> list[CatalogueItem]:
    """The Grocery Store dataset (Klasson et al. 2019) as a catalogue.

    Store photos from ``dataset/<split>.txt`` are ``domain="street"`` with their split; each fine class's
    iconic product image is ``domain="shop"`` with ``split=None`` (the shop catalogue every split searches).
    ``item_id`` = fine class name, ``category`` = coarse class name.

    Args:
        root: the dataset folder (holding ``dataset/``) or ``dataset/`` itself.
        split: ``"train"``, ``"val"``, ``"test"`` or ``None`` for every split file present.
    """
    root = Path(root)
    ds = root / "dataset" if (root / "dataset").is_dir() else root
    classes_csv = ds / "classes.csv"
    if not classes_csv.is_file():
        raise CatalogueError(f"{root}: not a Grocery Store dataset (no dataset/classes.csv)")
    classes: dict[int, dict[str, Any]] = {}
    with open(classes_csv, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        for values in reader:
            if not values:
                continue
            where = f"{classes_csv}: line {reader.line_num}"
            if len(values) < 5:
                raise CatalogueError(f"{where}: expected 6 fields, got {len(values)}")
            name, fine, coarse_name, coarse, iconic = (v.strip() for v in values[:5])
            try:
                # the iconic image's path names the top-level kind: iconic-images-and-descriptions/<kind>/...
                kind = Path(iconic.lstrip("/")).parts[1] if len(Path(iconic.lstrip("/")).parts) > 2 else coarse_name
                classes[int(fine)] = {"name": name, "coarse_name": coarse_name, "coarse": int(coarse),
                                      "iconic": iconic.lstrip("/"), "kind": kind}
            except ValueError:
                raise CatalogueError(f"{where}: class ids must be integers, got {fine!r}, {coarse!r}") from None

    splits = [split] if split else [s for s in SPLIT_NAMES if (ds / f"{s}.txt").is_file()]
    items: list[CatalogueItem] = []
    for s in splits:
        list_file = ds / f"{s}.txt"
        if not list_file.is_file():
            raise CatalogueError(f"{root}: no {s}.txt in the Grocery dataset (splits present: "
                                 f"{[x for x in SPLIT_NAMES if (ds / f'{x}.txt').is_file()]})")
        for line_no, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{list_file}: line {line_no}"
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3:
                raise CatalogueError(f"{where}: expected 'path, fine_id, coarse_id', got {line!r}")
            try:
                fine = int(parts[1])
            except ValueError:
                raise CatalogueError(f"{where}: fine class id must be an integer, got {parts[1]!r}") from None
            if fine not in classes:
                raise CatalogueError(f"{where}: fine class {fine} is not in classes.csv")
            c = classes[fine]
            path = _resolve_path(parts[0], ds, False, where, True)
            items.append(CatalogueItem(path, c["name"], c["coarse_name"], "street", s,
                                       {"fine_id": fine, "coarse_id": c["coarse"], "kind": c["kind"]}, line_no))
    if include_iconic:
        for fine, c in sorted(classes.items()):
            where = f"{classes_csv}: class {c['name']}"
            path = _resolve_path(c["iconic"], ds, False, where, True)
            items.append(CatalogueItem(path, c["name"], c["coarse_name"], "shop", None,
                                       {"fine_id": fine, "coarse_id": c["coarse"], "kind": c["kind"],
                                        "iconic": True}))
    return items


# --------------------------------------------------------------------------------------------- folders
def folder_catalogue(root: str | os.PathLike, skipped: list[tuple[str, str]] | None = None
                     ) -> list[CatalogueItem]:
    """A folder-per-class tree walked at every depth; an optional ``train/ val/ test/`` top level sets the split.

    An image's category is its first folder below the root (below the split), its item the folders between
    that and the file joined with ``/``: ``root/<class>/*.jpg`` -> item = category = class,
    ``root/<category>/<item>/*.jpg`` -> item, ``Fruit/Apple/Golden-Delicious/*.jpg`` -> category ``Fruit``,
    item ``Apple/Golden-Delicious``. Every file that does not become an item is appended to ``skipped`` (when
    given) as ``(path relative to the root, reason)``: nothing is dropped without a word.
    """
    root = Path(root).resolve()
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    has_splits = bool(subdirs) and all(d.name in SPLIT_NAMES for d in subdirs)
    report = skipped if skipped is not None else []
    items: list[CatalogueItem] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root)
        for d in list(dirnames):
            if d.startswith("."):
                report.append(((rel_dir / d).as_posix() + "/", "hidden folder, not walked"))
            elif (here / d).is_symlink():
                report.append(((rel_dir / d).as_posix() + "/", "symbolic link to a folder, not followed"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (here / d).is_symlink())
        parts = rel_dir.parts
        split = parts[0] if has_splits and parts else None
        classes = parts[1:] if split else parts
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            path = here / name
            reason = None
            if name.startswith("."):
                reason = "hidden file"
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                reason = f"not an image file name (accepted: {', '.join(IMAGE_EXTENSIONS)})"
            elif path.is_symlink() and not path.resolve().is_relative_to(root):
                reason = "symbolic link that leaves the catalogue root"
            elif not path.is_file():
                reason = "not a regular file"
            elif not classes:
                reason = ("image outside any class folder (expected root/<class>/*.jpg"
                          + (" below train/, val/ or test/)" if has_splits else ")"))
            if reason:
                report.append((rel, reason))
                continue
            item_id = "/".join(classes[1:]) or classes[0]
            items.append(CatalogueItem(path, item_id, classes[0], "shop", split, {}))
    if not items:
        raise CatalogueError(f"{root}: no images found in a folder-per-class layout "
                             f"(expected root/<class>/*.jpg or root/<category>/<item>/.../*.jpg)"
                             + (f"; skipped {len(report)} file(s), e.g. {report[0][0]}: {report[0][1]}"
                                if report else ""))
    return items


# --------------------------------------------------------------------------------------------- triplet CSVs
def _looks_like_triplets(path: Path) -> bool:
    with _open_text(path) as f:
        first = next(csv.reader(f), None)
    if not first:
        return False
    cells = {c.strip().lower() for c in first}
    if any(cells == h for h in TRIPLET_HEADERS):
        return True
    return len(first) == 3 and all(c.strip().lower().endswith(IMAGE_EXTENSIONS) for c in first)


def read_triplet_csv(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """Rows of an official MILDNet/Street2Shop triplet CSV (``q,p,n`` image paths; header optional)."""
    path = Path(path)
    out = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        for values in reader:
            if not values or all(not v.strip() for v in values):
                continue
            cells = [v.strip() for v in values]
            if reader.line_num == 1 and any({c.lower() for c in cells} == h for h in TRIPLET_HEADERS):
                continue
            if len(cells) < 3:
                raise CatalogueError(f"{path}: line {reader.line_num}: a triplet needs 3 paths (q,p,n), "
                                     f"got {len(cells)}")
            out.append((cells[0], cells[1], cells[2]))
    if not out:
        raise CatalogueError(f"{path}: no triplets")
    return out


def triplet_csv_catalogue(path: str | os.PathLike, root: str | os.PathLike | None = None, *,
                          allow_outside_root: bool = False, check_files: bool = True) -> list[CatalogueItem]:
    """A catalogue recovered from a triplet CSV: q and p are the same item (joined transitively), so
    ``item_id`` = the first path of each joined group; ``category`` = the image's parent folder name
    (Street2Shop keeps one folder per category); domain unknown -> ``"shop"``."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    triplets = read_triplet_csv(path)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    order: list[str] = []
    first_row: dict[str, int] = {}
    rank: dict[str, int] = {}
    for row, (q, p, n) in enumerate(triplets, 1):
        for x in (q, p, n):
            if x not in first_row:
                first_row[x] = row
                rank[x] = len(order)
                order.append(x)
        a, b = sorted((find(q), find(p)), key=rank.get)
        if a != b:
            parent[b] = a  # the group is named after its earliest path
    items = []
    for raw in order:
        where = f"{path}: triplet row {first_row[raw]}"
        resolved = _resolve_path(raw, root, allow_outside_root, where, check_files)
        group = find(raw)
        items.append(CatalogueItem(resolved, Path(group).stem, Path(raw).parent.name or "unknown", "shop", None,
                                   {}, first_row[raw]))
    return items


# --------------------------------------------------------------------------------------------- Fashion-MNIST
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
# Coarse groups so the 10 classes have in-class negatives (tops, footwear, ...).
FASHION_CATEGORIES = ("tops", "bottoms", "tops", "dresses", "tops", "footwear", "tops", "footwear", "bags",
                      "footwear")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format; ``.gz`` accepted): magic ``0 0 dtype ndim``, big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CatalogueError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise CatalogueError(f"{path}: not an IDX file (bad magic {data[:4].hex()})")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES or ndim < 1:
        raise CatalogueError(f"{path}: unsupported IDX type 0x{dtype_code:02x} / {ndim} dims")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CatalogueError(f"{path}: IDX header truncated")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise CatalogueError(f"{path}: IDX body is {len(data) - header} bytes, dims {dims} need {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise CatalogueError(f"{root}: no {stem}[.gz] (expected Fashion-MNIST IDX files there)")


def fashion_mnist_catalogue(root: str | os.PathLike = "/usr/share/datasets/fashion-mnist",
                            out_dir: str | os.PathLike = "fashion-mnist-images", *,
                            limit_per_split: int | None = None) -> list[CatalogueItem]:
    """Fashion-MNIST (IDX) as a catalogue: images are written once as PNGs under ``out_dir`` (the catalogue
    holds paths). ``item_id`` = class name, ``category`` = a coarse group; ``train`` -> split train,
    ``t10k`` -> split val."""
    from PIL import Image

    root, out_dir = Path(root), Path(out_dir)
    items: list[CatalogueItem] = []
    for prefix, split in (("train", "train"), ("t10k", "val")):
        images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise CatalogueError(f"{root}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        n = len(images) if limit_per_split is None else min(limit_per_split, len(images))
        for i in range(n):
            label = int(labels[i])
            if not 0 <= label < len(FASHION_CLASSES):
                raise CatalogueError(f"{root}: {prefix} label {i} is {label}, outside 0..9")
            path = (out_dir / split / f"{i:05d}.png").resolve()
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(images[i]), "L").save(path)
            items.append(CatalogueItem(path, FASHION_CLASSES[label], FASHION_CATEGORIES[label], "shop", split,
                                       {"index": i, "class_index": label}))  # not "label": a column alias
    return items


# --------------------------------------------------------------------------------------------- images
def check_images(items: Sequence[CatalogueItem], *, max_bad_fraction: float = 0.05
                 ) -> tuple[list[CatalogueItem], list[str]]:
    """Decode every image; return the readable items and one message per unreadable one (with its row).

    A few bad images in a large catalogue are reported and skipped; if more than ``max_bad_fraction`` are
    bad, something is wrong with the whole catalogue and :class:`CatalogueError` is raised.
    """
    good, bad = [], []
    for i, it in enumerate(items):
        try:
            decode_image(it.path, name=f"row {it.row or i + 1} ({it.path})")
            good.append(it)
        except ImageDecodeError as e:
            bad.append(str(e))
    for msg in bad:
        warnings.warn(f"skipping unreadable image: {msg}", stacklevel=2)
    if items and len(bad) > max(1, max_bad_fraction * len(items)):
        raise CatalogueError(f"{len(bad)} of {len(items)} images are unreadable (first: {bad[0]})")
    return good, bad
