"""Inputs for tools/make_shards.py written the way their producers write them: Parquet files (as
the Hugging Face hub ships image sets), folders in the exact layout of ``datasets``'
``save_to_disk`` (written here with pyarrow; the ``datasets`` package is not needed), path lists,
and tar shards written by plain ``tarfile`` (no sizes.json), as other WebDataset tools write them."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from tests.data.conftest import id_png

HF_IMAGE = {"_type": "Image"}


def hf_schema_metadata(features: dict) -> dict[bytes, bytes]:
    """The schema metadata ``datasets``' ArrowWriter stores: {"huggingface": {"info": {"features": ...}}}."""
    return {b"huggingface": json.dumps({"info": {"features": features}, "fingerprint": "0123456789abcdef"}).encode()}


def image_table(ids: list[int], labels: list | None = None, *, column: str = "image", struct: bool = True,
                label_names: list[str] | None = None, bad: dict[int, bytes | None] | None = None, paths: dict | None = None,
                size: int = 12):
    """A pyarrow Table of id-coded PNGs: a struct {bytes, path} column (``datasets``' Image storage)
    or plain binary, plus an optional label column (ClassLabel int64 when ``label_names``)."""
    import pyarrow as pa

    bad, paths = bad or {}, paths or {}
    data = [bad[i] if i in bad else id_png(i, size) for i in ids]
    if struct:
        values = [{"bytes": d, "path": paths.get(i, f"img_{i:05d}.png" if d is not None else None)}
                  for i, d in zip(ids, data)]
        images = pa.array(values, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        images = pa.array(data, type=pa.binary())
    columns, features = {column: images}, {column: HF_IMAGE}
    if labels is not None:
        if label_names is not None or all(isinstance(v, int) for v in labels):
            columns["label"] = pa.array(labels, type=pa.int64())
            if label_names is not None:
                features["label"] = {"names": label_names, "_type": "ClassLabel"}
        else:
            columns["label"] = pa.array(labels, type=pa.string())
            features["label"] = {"dtype": "string", "_type": "Value"}
    table = pa.table(columns)
    return table.replace_schema_metadata(hf_schema_metadata(features)) if struct else table


def write_parquet(path: Path, table, row_group_size: int = 5) -> Path:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_save_to_disk(folder: Path, table, num_shards: int = 2, batch_rows: int = 4, split: str | None = None) -> Path:
    """``Dataset.save_to_disk(folder, num_shards=...)``: data-0000k-of-0000n.arrow (Arrow IPC
    streams, the schema carrying the features), state.json listing them, dataset_info.json."""
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    n = table.num_rows
    names = []
    for k in range(num_shards):  # contiguous shards, as Dataset.shard(contiguous=True) cuts them
        lo, hi = k * n // num_shards, (k + 1) * n // num_shards
        name = f"data-{k:05d}-of-{num_shards:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                for start in range(lo, hi, batch_rows):
                    writer.write_table(table.slice(start, min(batch_rows, hi - start)))
        names.append(name)
    state = {"_data_files": [{"filename": f} for f in names], "_fingerprint": "0123456789abcdef",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": split}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return folder


def write_dataset_dict(folder: Path, splits: dict) -> Path:
    """``DatasetDict.save_to_disk``: dataset_dict.json naming the splits, one folder per split."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, table in splits.items():
        write_save_to_disk(folder / name, table, num_shards=1, split=name)
    return folder


def write_image_files(folder: Path, ids: list[int], size: int = 12) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in ids:
        name = f"sub/img {i:05d}.png" if i % 2 else f"img_{i:05d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(id_png(i, size))
        names.append(name)
    return names


def write_tarfile_shard(path: Path, ids: list[int], size: int = 12) -> None:
    """A shard as plain tar tools write it: a directory entry first, members with owner and
    mtime of their own, three members per sample (png, cls, json), no sizes.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        d = tarfile.TarInfo("shard_dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for i in ids:
            for ext, data in (("png", id_png(i, size)), ("cls", str(i % 3).encode()),
                              ("json", json.dumps({"id": i}).encode())):
                info = tarfile.TarInfo(f"shard_dir/{i:07d}.{ext}")
                info.size, info.mtime, info.uname = len(data), 1_700_000_000 + i, "someone"
                tar.addfile(info, io.BytesIO(data))
