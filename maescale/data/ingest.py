"""The inputs ``tools/make_shards.py`` converts, read into the shard writer's :class:`Item` stream:
an image folder (:func:`maescale.data.shards.make_shards`), Parquet files, a Hugging Face
``datasets`` folder written by ``save_to_disk``, or a text/CSV list of image paths.

* **Parquet** (``pip install 'maescale[parquet]'``): one file, a folder of ``*.parquet`` files or a
  glob. Read one row group at a time, only the image and label columns.
* **save_to_disk folders** (``pip install 'maescale[hf]'``), read with ``pyarrow`` alone, without
  the ``datasets`` package. The layout ``datasets`` writes: ``state.json`` lists the data files
  (``{"_data_files": [{"filename": "data-00000-of-00002.arrow"}, ...], ...}``), each an Arrow IPC
  *stream* (memory-mapped here, so nothing is copied until a row is used);
  ``dataset_info.json`` holds the features (``{"image": {"_type": "Image"}, "label": {"_type":
  "ClassLabel", "names": [...]}}``). A ``DatasetDict`` folder has ``dataset_dict.json``
  (``{"splits": [...]}``) and one such folder per split (``split``; ``train`` by default).
* **Path lists**: ``.txt`` / ``.lst`` (one path per line; ``#`` comments) or ``.csv`` / ``.tsv``
  with a header row (an image path column and an optional label column). Relative paths are
  taken from the list's folder (or ``root``).

Columns. An image column is a struct ``{bytes, path}`` (the ``Image`` feature's storage; a row
with null bytes reads its ``path``), plain binary, or, when named explicitly, a string of paths.
Without ``image_column`` it is the column typed ``Image`` in the features, else the only struct
or binary column (``image``/``img``/``jpg``/``png``... when several), else an error listing the
columns. Labels are optional (``label_column``; ``"auto"``: the only ``ClassLabel`` column, else
a column named ``label``; ``None``/``"none"``: no labels): integers are kept (negative ones, the
``datasets`` mark for "no label", mean none), strings become indices of their sorted names; the
class names (from ``ClassLabel`` or the strings) go into ``sizes.json`` / ``manifest.json``.

Order. With ``shuffle`` (the default), lists are shuffled whole (seeded) like folders; tables are
read in a seeded random order of their row groups (Parquet) or 1,024-row blocks (Arrow) and mixed
through a buffer of ``shuffle_buffer`` images (their bytes are held in memory), so that shards
mix classes even when the table is sorted by class.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import random
from typing import Any, Iterator

from maescale.data.plan import shuffled
from maescale.data.shards import IMAGE_EXTENSIONS, Item, ShardSummary, make_shards, write_items

logger = logging.getLogger(__name__)

FORMATS = ("auto", "folder", "parquet", "hf", "list")
LIST_SUFFIXES = (".txt", ".lst", ".csv", ".tsv")
IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "picture", "photo")
PATH_NAMES = ("path", "image", "image_path", "file", "filename", "filepath", "file_name", "img")
LABEL_NAMES = ("label", "labels", "class", "cls")
ARROW_BLOCK = 1024


class InputError(ValueError):
    """An input that cannot be converted: the message names it and what to do."""


class MissingExtra(ImportError):
    """A package an input format needs is not installed; the message names the extra."""


def _pyarrow(fmt: str) -> Any:
    extra = "hf" if fmt == "hf" else "parquet"
    what = "a save_to_disk folder" if fmt == "hf" else "Parquet files"
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingExtra(f"reading {what} needs pyarrow, which is not installed: "
                           f"pip install 'maescale[{extra}]' (or pip install pyarrow)") from None
    return pyarrow


# --------------------------------------------------------------------------------------------
# Which input
# --------------------------------------------------------------------------------------------


def detect_format(path: str) -> str:
    """``folder``, ``parquet``, ``hf`` or ``list`` for an input path (a file, folder or glob)."""
    if any(c in path for c in "*?["):
        matches = sorted(glob.glob(path))
        if not matches:
            raise InputError(f"the input pattern '{path}' matches no files")
        if all(m.endswith(".parquet") for m in matches):
            return "parquet"
        raise InputError(f"the input pattern '{path}' matches files other than *.parquet (e.g. "
                         f"'{next(m for m in matches if not m.endswith('.parquet'))}'); globs are for Parquet files")
    if os.path.isfile(path):
        if path.endswith((".parquet", ".pq")):
            return "parquet"
        if path.lower().endswith(LIST_SUFFIXES):
            return "list"
        raise InputError(f"cannot tell what the input file '{path}' is: expected .parquet, or a path list "
                         f"({', '.join(LIST_SUFFIXES)}); or pass --format")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json")):
            return "hf"
        if glob.glob(os.path.join(glob.escape(path), "*.parquet")):
            return "parquet"
        return "folder"
    raise FileNotFoundError(f"the input '{path}' does not exist")


# --------------------------------------------------------------------------------------------
# Tables: Parquet and save_to_disk
# --------------------------------------------------------------------------------------------


class _Table:
    """One data file of a table input, read in blocks: Parquet row groups, or 1,024-row slices of
    a memory-mapped Arrow stream."""

    def __init__(self, path: str, kind: str, features: dict[str, Any] | None):
        pa = _pyarrow("hf" if kind == "arrow" else "parquet")
        self.path, self.kind = path, kind
        self._parquet = self._arrow = None
        try:
            if kind == "parquet":
                self._parquet = pa.parquet.ParquetFile(path)
                self.schema = self._parquet.schema_arrow
                meta = self._parquet.metadata
                self.num_rows, first, self.blocks = meta.num_rows, 0, []
                for g in range(meta.num_row_groups):
                    self.blocks.append((first, g))
                    first += meta.row_group(g).num_rows
            else:
                with pa.memory_map(path, "r") as source:
                    self._arrow = pa.ipc.open_stream(source).read_all()  # zero-copy over the map
                self.schema, self.num_rows = self._arrow.schema, self._arrow.num_rows
                self.blocks = [(first, i) for i, first in enumerate(range(0, self.num_rows, ARROW_BLOCK))]
        except (OSError, pa.ArrowException) as exc:
            what = "a Parquet file" if kind == "parquet" else "an Arrow IPC stream (a save_to_disk data file)"
            raise InputError(f"cannot read '{path}' as {what}: {exc}") from None
        self.features = features if features else _schema_features(self.schema)

    def read(self, block: int, columns: list[str]) -> tuple[int, dict[str, list]]:
        """``(first row, {column: values})`` of one block."""
        first, index = self.blocks[block]
        if self._parquet is not None:
            table = self._parquet.read_row_group(index, columns=columns)
        else:
            stop = self.blocks[block + 1][0] if block + 1 < len(self.blocks) else self.num_rows
            table = self._arrow.select(columns).slice(first, stop - first)
        return first, {c: table.column(c).to_pylist() for c in columns}


def _schema_features(schema: Any) -> dict[str, Any]:
    """The ``datasets`` features stored in an Arrow/Parquet schema's metadata, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        return dict(json.loads(raw)["info"]["features"])
    except (ValueError, KeyError, TypeError):
        return {}


def _column_kind(pa: Any, typ: Any) -> str | None:
    """``struct`` ({bytes, path}), ``binary`` or ``path`` (strings); None for anything else."""
    t = pa.types
    if t.is_struct(typ):
        names = [typ.field(i).name for i in range(typ.num_fields)]
        if "bytes" in names and (t.is_binary(typ.field("bytes").type) or t.is_large_binary(typ.field("bytes").type)):
            return "struct"
        return None
    if t.is_binary(typ) or t.is_large_binary(typ) or t.is_fixed_size_binary(typ):
        return "binary"
    if t.is_string(typ) or t.is_large_string(typ):
        return "path"
    return None


def _describe(schema: Any) -> str:
    return ", ".join(f"'{f.name}' ({f.type})" for f in schema)


def _pick_image_column(pa: Any, schema: Any, features: dict[str, Any], requested: str | None,
                       where: str) -> tuple[str, str]:
    names = list(schema.names)
    if requested:
        if requested not in names:
            raise InputError(f"{where} has no column '{requested}' (--image-column); its columns: {_describe(schema)}")
        kind = _column_kind(pa, schema.field(requested).type)
        if kind is None:
            raise InputError(f"{where}: the column '{requested}' is {schema.field(requested).type}; an image column is "
                             f"a struct {{bytes, path}}, binary, or a string of file paths")
        return requested, kind
    typed = [n for n in names if isinstance(features.get(n), dict) and features[n].get("_type") == "Image"]
    candidates = typed or [n for n in names if _column_kind(pa, schema.field(n).type) in ("struct", "binary")]
    if len(candidates) > 1:
        named = [n for n in candidates if n.lower() in IMAGE_NAMES]
        if len(named) == 1:
            candidates = named
    if len(candidates) == 1:
        return candidates[0], _column_kind(pa, schema.field(candidates[0]).type) or "binary"
    if not candidates:
        raise InputError(f"{where}: no column holds images (a struct {{bytes, path}} or binary column); its columns: "
                         f"{_describe(schema)}. Name one with --image-column (a string column of paths works too)")
    raise InputError(f"{where}: several columns could hold the images ({', '.join(repr(c) for c in candidates)}); "
                     f"choose one with --image-column. Its columns: {_describe(schema)}")


def _pick_label_column(pa: Any, schema: Any, features: dict[str, Any], requested: str | None,
                       where: str) -> tuple[str | None, list[str] | None]:
    """``(column or None, ClassLabel names or None)``."""
    names = list(schema.names)
    if requested is None or requested.lower() == "none":
        return None, None
    if requested != "auto":
        if requested not in names:
            raise InputError(f"{where} has no column '{requested}' (--label-column); its columns: "
                             f"{_describe(schema)} (--label-column none: no labels)")
        column = requested
    else:
        typed = [n for n in names if isinstance(features.get(n), dict) and features[n].get("_type") == "ClassLabel"]
        if len(typed) == 1:
            column = typed[0]
        elif "label" in names:
            column = "label"
        else:
            return None, None
    typ = schema.field(column).type
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if not (pa.types.is_integer(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        if requested == "auto":
            return None, None
        raise InputError(f"{where}: the label column '{column}' is {typ}; labels are integers or strings")
    feature = features.get(column)
    names_ = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return column, list(names_) if names_ else None


def _table_files(fmt: str, path: str, split: str | None) -> tuple[list[str], str, dict[str, Any] | None, str]:
    """``(data files, kind, features from dataset_info.json, description)`` of a table input."""
    if fmt == "parquet":
        if os.path.isdir(path):
            files = sorted(glob.glob(os.path.join(glob.escape(path), "*.parquet")))
        elif any(c in path for c in "*?["):
            files = sorted(glob.glob(path))
        else:
            files = [path]
        if not files:
            raise InputError(f"no Parquet files (*.parquet) at '{path}'")
        return files, "parquet", None, path
    root = path
    if os.path.isfile(os.path.join(root, "dataset_dict.json")):
        with open(os.path.join(root, "dataset_dict.json"), encoding="utf-8") as fh:
            splits = list(json.load(fh).get("splits", []))
        if split is None:
            if len(splits) == 1 or "train" in splits:
                split = splits[0] if len(splits) == 1 else "train"
                logger.info("%s is a DatasetDict with splits %s: reading '%s' (--split to choose)", root, splits, split)
            else:
                raise InputError(f"'{root}' is a DatasetDict with the splits {splits}: choose one with --split")
        if split not in splits:
            raise InputError(f"'{root}' has no split '{split}' (--split); its splits: {splits}")
        root = os.path.join(root, split)
    elif split is not None:
        raise InputError(f"'{root}' is a single dataset (no dataset_dict.json), not a DatasetDict: drop --split")
    state_path = os.path.join(root, "state.json")
    try:
        with open(state_path, encoding="utf-8") as fh:
            state = json.load(fh)
        files = [os.path.join(root, f["filename"]) for f in state["_data_files"]]
    except FileNotFoundError:
        raise InputError(f"'{root}' is not a save_to_disk folder: it has no state.json") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"'{state_path}' does not list the data files ('_data_files'): {exc}") from None
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise InputError(f"'{state_path}' lists data files that do not exist: {missing[:5]}")
    if not files:
        raise InputError(f"'{state_path}' lists no data files")
    features = None
    info_path = os.path.join(root, "dataset_info.json")
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as fh:
            features = dict(json.load(fh).get("features") or {})
    return files, "arrow", features, root


def _resolve(value: str, base: str) -> str:
    return value if os.path.isabs(value) else os.path.join(base, value)


def _table_items(tables: list[_Table], image: tuple[str, str], label: tuple[str | None, list[str] | None],
                 class_index: dict[str, int] | None, base: str, shuffle: bool, seed: int,
                 buffer: int) -> Iterator[Item]:
    column, kind = image
    label_col, label_names = label
    columns = [column] + ([label_col] if label_col and label_col != column else [])
    order = [(t, b) for t in range(len(tables)) for b in range(len(tables[t].blocks))]
    if shuffle:
        random.Random(seed).shuffle(order)

    def rows() -> Iterator[Item]:
        for t, b in order:
            table = tables[t]
            first, values = table.read(b, columns)
            source = os.path.relpath(table.path, base)
            folder = os.path.dirname(table.path)
            for i, value in enumerate(values[column]):
                row = first + i
                data = path = original = None
                if kind == "struct" and value is not None:
                    data, original = value.get("bytes"), value.get("path")
                    if data is None and original:
                        path = _resolve(original, folder)
                elif kind == "binary":
                    data = value
                elif kind == "path" and value:
                    original = value
                    path = _resolve(value, folder)
                lab: int | None = None
                cls: str | None = None
                raw = values[label_col][i] if label_col else None
                if isinstance(raw, str):
                    lab, cls = class_index[raw] if class_index else None, raw  # type: ignore[index]
                elif isinstance(raw, int) and raw >= 0:
                    lab = raw
                    cls = label_names[raw] if label_names and raw < len(label_names) else None
                stem = f"{os.path.splitext(os.path.basename(table.path))[0]}_{row}"
                name = os.path.splitext(os.path.basename(original))[0] if original else stem
                where = f"{source} row {row}" + (f" ({original})" if original else "")
                meta = {"source": source, "row": row, "path": original, "class": cls, "label": lab}
                yield Item(name, where, data=bytes(data) if data is not None else None, path=path, label=lab,
                           meta=meta)

    yield from (shuffled(rows(), buffer, random.Random(seed + 1)) if shuffle else rows())


def _convert_table(fmt: str, path: str, split: str | None, image_column: str | None, label_column: str | None,
                   shuffle: bool, seed: int, shuffle_buffer: int) -> tuple[Iterator[Item], int, list[str], dict]:
    pa = _pyarrow(fmt)
    files, kind, features, described = _table_files(fmt, path, split)
    tables = [_Table(f, kind, features) for f in files]
    first = tables[0]
    where = f"'{first.path}'"
    image = _pick_image_column(pa, first.schema, first.features, image_column, where)
    label = _pick_label_column(pa, first.schema, first.features, label_column, where)
    for t in tables[1:]:
        missing = [c for c in (image[0], label[0]) if c and c not in t.schema.names]
        if missing:
            raise InputError(f"'{t.path}' has no column {missing[0]!r} (found in '{first.path}'); its columns: "
                             f"{_describe(t.schema)}")
    classes: list[str] = list(label[1] or [])
    class_index: dict[str, int] | None = None
    if label[0] is not None and not classes:
        typ = first.schema.field(label[0]).type
        if pa.types.is_dictionary(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ):
            seen: set[str] = set()
            for t in tables:  # one pass over the label column for the class names
                for b in range(len(t.blocks)):
                    seen.update(v for v in t.read(b, [label[0]])[1][label[0]] if v is not None)
            classes = sorted(seen)
            class_index = {c: i for i, c in enumerate(classes)}
    total = sum(t.num_rows for t in tables)
    if total == 0:
        raise InputError(f"the input '{path}' has no rows")
    logger.info("reading %d rows from %d %s files of %s: images from column '%s' (%s)%s", total, len(tables),
                "Parquet" if kind == "parquet" else "Arrow", described, image[0], image[1],
                f", labels from '{label[0]}'" + (f" ({len(classes)} classes)" if classes else "") if label[0] else
                ", no labels")
    base = os.path.dirname(os.path.abspath(files[0])) if fmt == "parquet" else os.path.abspath(described)
    items = _table_items(tables, image, label, class_index, base, shuffle, seed, shuffle_buffer)
    source = {"format": fmt, "input": os.path.abspath(path), "split": split if fmt == "hf" else None,
              "files": [os.path.relpath(os.path.abspath(f), base) for f in files], "rows": total,
              "image_column": image[0], "label_column": label[0], "shuffle": shuffle, "seed": seed,
              "shuffle_buffer": shuffle_buffer if shuffle else None}
    return items, total, classes, source


# --------------------------------------------------------------------------------------------
# Path lists
# --------------------------------------------------------------------------------------------


def _read_list(path: str, image_column: str | None, label_column: str | None) -> tuple[list[tuple[str, str | None]],
                                                                                      str | None, str | None]:
    """``([(path, raw label or None)], image column, label column)`` of a list file."""
    with open(path, encoding="utf-8", newline="") as fh:
        text = fh.read()
    lower = path.lower()
    if not lower.endswith((".csv", ".tsv")):
        if label_column not in (None, "auto", "none"):
            raise InputError(f"'{path}' is a plain list (one path per line) and has no label column; use a .csv "
                             f"or .tsv with a header row for labels")
        entries = [line.strip() for line in text.splitlines()]
        return [(e, None) for e in entries if e and not e.startswith("#")], None, None
    reader = csv.reader(text.splitlines(), delimiter="\t" if lower.endswith(".tsv") else ",")
    rows = [r for r in reader if r]
    if not rows:
        raise InputError(f"the list '{path}' is empty")
    header = [h.strip() for h in rows[0]]
    if any(os.path.splitext(h)[1].lower() in IMAGE_EXTENSIONS for h in header):
        raise InputError(f"'{path}' needs a header row naming its columns (e.g. 'path,label'); its first row is "
                         f"{rows[0]}")
    cols = ", ".join(repr(h) for h in header)
    if image_column:
        if image_column not in header:
            raise InputError(f"'{path}' has no column '{image_column}' (--image-column); its columns: {cols}")
        img = image_column
    else:
        named = [h for h in header if h.lower() in PATH_NAMES]
        if len(header) == 1:
            img = header[0]
        elif len(named) == 1:
            img = named[0]
        else:
            raise InputError(f"'{path}': cannot tell which column holds the image paths (columns: {cols}); "
                             f"choose one with --image-column")
    lab: str | None
    if label_column is None or label_column.lower() == "none":
        lab = None
    elif label_column == "auto":
        named = [h for h in header if h.lower() in LABEL_NAMES and h != img]
        lab = named[0] if len(named) == 1 else None
    elif label_column not in header:
        raise InputError(f"'{path}' has no column '{label_column}' (--label-column); its columns: {cols}")
    else:
        lab = label_column
    i, j = header.index(img), header.index(lab) if lab else -1
    out = []
    for n, r in enumerate(rows[1:], start=2):
        if len(r) <= max(i, j):
            raise InputError(f"'{path}' line {n} has {len(r)} fields, fewer than the header's {len(header)}: {r}")
        out.append((r[i].strip(), r[j].strip() if j >= 0 else None))
    return out, img, lab


def _convert_list(path: str, root: str | None, image_column: str | None, label_column: str | None,
                  shuffle: bool, seed: int) -> tuple[Iterator[Item], int, list[str], dict]:
    entries, img, lab = _read_list(path, image_column, label_column)
    entries = [e for e in entries if e[0]]
    if not entries:
        raise InputError(f"the list '{path}' names no images")
    base = os.path.abspath(root) if root else os.path.dirname(os.path.abspath(path))
    raw = [r for _, r in entries if r not in (None, "")]
    classes: list[str] = []
    index: dict[str, int] = {}
    if raw and not all(_is_int(r) for r in raw):
        classes = sorted(set(raw))  # type: ignore[arg-type]
        index = {c: i for i, c in enumerate(classes)}
    if shuffle:
        random.Random(seed).shuffle(entries)

    def items() -> Iterator[Item]:
        for listed, r in entries:
            label = cls = None
            if r not in (None, ""):
                if index:
                    label, cls = index[r], r  # type: ignore[index]
                elif int(r) >= 0:  # type: ignore[arg-type]
                    label = int(r)  # type: ignore[arg-type]
            yield Item(os.path.splitext(listed)[0], listed, path=_resolve(listed, base), label=label,
                       meta={"path": listed, "class": cls, "label": label})

    logger.info("reading %d paths from %s%s", len(entries), path, f", labels from '{lab}'" if lab else "")
    source = {"format": "list", "input": os.path.abspath(path), "root": base, "images": len(entries),
              "image_column": img, "label_column": lab, "shuffle": shuffle, "seed": seed}
    return items(), len(entries), classes, source


def _is_int(text: str | None) -> bool:
    try:
        int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def convert(input_path: str | os.PathLike, output_dir: str | os.PathLike, *, input_format: str = "auto",
            image_column: str | None = None, label_column: str | None = "auto", split: str | None = None,
            root: str | None = None, shuffle_buffer: int = 5000, maxcount: int = 1000, maxsize: int = 1 << 30,
            workers: int = 1, resize: int | None = None, shuffle: bool = True, seed: int = 0, prefix: str = "shard",
            overwrite: bool = False) -> ShardSummary:
    """Shard any supported input (see the module docstring) into ``output_dir``: shards,
    ``sizes.json`` and ``manifest.json``. Raises :class:`InputError` (a ``ValueError``) for an
    input it cannot read, :class:`MissingExtra` (an ``ImportError``) naming the extra to install."""
    path = os.fspath(input_path)
    if input_format not in FORMATS:
        raise InputError(f"unknown input format '{input_format}'; one of {', '.join(FORMATS)}")
    fmt = detect_format(path) if input_format == "auto" else input_format
    common = dict(maxcount=maxcount, maxsize=maxsize, workers=workers, resize=resize, prefix=prefix,
                  overwrite=overwrite)
    if fmt == "folder":
        given = [n for n, v in (("--image-column", image_column), ("--split", split), ("--root", root),
                                ("--label-column", label_column != "auto")) if v]
        if given:
            raise InputError(f"{', '.join(given)}: not for an image folder ('{path}'), whose classes are its "
                             f"sub-folders")
        return make_shards(path, output_dir, shuffle=shuffle, seed=seed, **common)  # type: ignore[arg-type]
    if fmt == "list":
        items, total, classes, source = _convert_list(path, root, image_column, label_column, shuffle, seed)
    else:
        items, total, classes, source = _convert_table(fmt, path, split, image_column, label_column, shuffle, seed,
                                                       shuffle_buffer)
    source["resize"] = resize
    return write_items(items, output_dir, total=total, classes=classes, source=source, **common)  # type: ignore[arg-type]
