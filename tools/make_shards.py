#!/usr/bin/env python
"""Write WebDataset shards (+ sizes.json, manifest.json) from an image folder, Parquet files, a
Hugging Face `datasets` folder written by save_to_disk, or a list of image paths.

    python tools/make_shards.py --input /data/imagenet/train --output /data/in1k-shards \\
        --maxcount 1000 --workers 16 [--resize 512]
    python tools/make_shards.py --input '/data/hub/train-*.parquet' --output shards/ [--image-column image]
    python tools/make_shards.py --input /data/saved_ds --output shards/ [--split train]
    python tools/make_shards.py --input images.csv --output shards/ [--label-column label]

The input kind is detected (--format to force it): a folder with state.json or dataset_dict.json
is a save_to_disk folder, a folder of *.parquet files, a .parquet file or a glob is Parquet, a
.txt/.lst/.csv/.tsv file is a path list, any other folder an image folder (ImageNet-style class
folders: the class is the first folder level; or flat). Writes shard-000000.tar, ..., sizes.json
and manifest.json into --output, nothing else, nowhere else. Parquet and save_to_disk need
pyarrow (pip install 'maescale[parquet]' / 'maescale[hf]'). The logic lives in
:mod:`maescale.data.ingest` and :mod:`maescale.data.shards`.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.data.ingest import FORMATS, convert  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="image folder, Parquet file/folder/glob, save_to_disk folder, or path list (.txt/.csv/.tsv)")
    p.add_argument("--output", required=True, help="folder for the shards, sizes.json and manifest.json")
    p.add_argument("--format", default="auto", choices=FORMATS, help="input kind (default: detected)")
    p.add_argument("--image-column", default=None,
                   help="table/CSV column holding the images (default: detected; an error lists the columns "
                        "when it cannot tell)")
    p.add_argument("--label-column", default="auto",
                   help="column holding the labels, written as KEY.cls (default auto: a ClassLabel column or "
                        "one named 'label'; 'none': no labels)")
    p.add_argument("--split", default=None, help="split of a save_to_disk DatasetDict (default: train)")
    p.add_argument("--root", default=None, help="folder that relative paths of a path list start from "
                                                "(default: the list's folder)")
    p.add_argument("--shuffle-buffer", type=int, default=5000,
                   help="tables: images mixed in memory while shuffling (default 5000)")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most (default 1000)")
    p.add_argument("--maxsize", type=int, default=1 << 30, help="bytes per shard at most (default 1 GiB)")
    p.add_argument("--workers", type=int, default=1, help="processes reading/checking/re-encoding images")
    p.add_argument("--resize", type=int, default=None, metavar="N",
                   help="re-encode images whose shorter side exceeds N to that size (JPEG q95)")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default shard)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    p.add_argument("--no-shuffle", action="store_true", help="keep the input order (shards will not mix classes)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = convert(args.input, args.output, input_format=args.format, image_column=args.image_column,
                          label_column=args.label_column, split=args.split, root=args.root,
                          shuffle_buffer=args.shuffle_buffer, maxcount=args.maxcount, maxsize=args.maxsize,
                          workers=args.workers, resize=args.resize, shuffle=not args.no_shuffle, seed=args.seed,
                          prefix=args.prefix, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary.total} samples in {len(summary.shards)} shards, {summary.skipped} files skipped -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
