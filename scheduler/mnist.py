"""Importing MNIST from its four IDX files into a sharded, ready-to-train dataset.

Runs here, not on a worker, because the files are on this machine. All four files
are read and checked before anything is written, and the rows and shards go in one
transaction: a bad file leaves no trace.

Splits: MNIST's own test file is the test split; the last ``val_fraction`` of its
train file is the val split (the convention of holding out the train file's tail).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from sqlalchemy import select

from shared import shardfmt
from shared.artifacts import put_bytes
from shared.db import session_scope
from shared.errors import InputError, SpecError
from shared.idx import Idx, read_idx
from shared.schema import Dataset, Job
from shared.settings import get_settings
from shared.state import record_done_import, stored_shard

SIDE = 28
STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def find_file(folder: Path, stem: str) -> Path:
    """``stem`` in ``folder``, raw or ``.gz``, also spelled with a dot (``train-images
    .idx3-ubyte``, as some mirrors ship it). Raises InputError when absent."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"{folder}: no {stem} (or {stem}.gz) file")


@dataclass
class MnistFiles:
    train_images: Idx
    train_labels: Idx
    test_images: Idx
    test_labels: Idx

    @property
    def count(self) -> int:
        return self.train_images.count + self.test_images.count


def _pair(images: Idx, labels: Idx) -> None:
    if images.count != labels.count:
        raise InputError(f"{images.path} holds {images.count} images but "
                         f"{labels.path} holds {labels.count} labels")
    if (images.rows, images.cols) != (SIDE, SIDE):
        raise InputError(f"{images.path}: images are {images.rows}x{images.cols}; "
                         f"MNIST digits are {SIDE}x{SIDE}")
    bad = next((i for i, v in enumerate(labels.body) if v > 9), None)
    if bad is not None:
        raise InputError(f"{labels.path}: label {labels.body[bad]} at index {bad} is not a digit")


def scan_mnist(folder: Path) -> MnistFiles:
    """Read and check the four files. Raises InputError naming the first bad file."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a directory")
    files = MnistFiles(*(read_idx(find_file(folder, STEMS[key]), key[1]) for key in STEMS))
    _pair(files.train_images, files.train_labels)
    _pair(files.test_images, files.test_labels)
    return files


def _png(pixels: bytes) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("L", (SIDE, SIDE), pixels).save(buf, format="PNG")
    return buf.getvalue()


def plan_mnist(files: MnistFiles, folder: Path, name: str, shard_size: int,
               val_fraction: float, progress: Callable[[int], None] | None = None) -> int:
    """Store checked MNIST files as train/val/test shards of a ready dataset.

    Returns the import job's id. Raises SpecError if the name is taken or the val
    fraction leaves no train or val items.
    """
    n_train = files.train_images.count
    n_val = int(n_train * val_fraction)
    if n_val < 1 or n_val >= n_train:
        raise SpecError(f"val fraction {val_fraction} of {n_train} train images leaves "
                        "no val or no train split")
    # (split, source file pair, first source index, count)
    parts = [("train", files.train_images, files.train_labels, 0, n_train - n_val),
             ("val", files.train_images, files.train_labels, n_train - n_val, n_val),
             ("test", files.test_images, files.test_labels, 0, files.test_images.count)]
    with session_scope() as s:
        if s.execute(select(Dataset.id).where(Dataset.name == name)).first():
            raise SpecError(f"a dataset named {name!r} already exists")
        spec = {"dir": str(folder.resolve()), "name": name, "format": "mnist-idx",
                "shard_size": shard_size, "val_fraction": val_fraction}
        job = Job(kind="import", spec=spec, settings=get_settings().redacted())
        s.add(job)
        s.flush()
        ds = Dataset(name=name, kind="mnist", charset="0123456789", length=1,
                     width=SIDE, height=SIDE, count=files.count, layout_job_id=job.id,
                     meta={"source": "idx"})
        s.add(ds)
        s.flush()
        job.dataset_id = ds.id
        record_done_import(job, ds, ready=True)
        index = 0
        for split, images, labels, first, count in parts:
            for start in range(0, count, shard_size):
                n = min(shard_size, count - start)
                items = [shardfmt.Item(start + i, str(labels.body[first + start + i]),
                                       _png(images.image(first + start + i)))
                         for i in range(n)]
                meta = {"split": split, "start": start, "kind": "mnist",
                        "charset": "0123456789", "length": 1, "width": SIDE, "height": SIDE}
                sha = put_bytes(s, shardfmt.pack(items, meta), shardfmt.MEDIA_TYPE)
                s.add(stored_shard(job_id=job.id, dataset_id=ds.id, index=index,
                                   split=split, start=start, count=n, seed=0, sha256=sha))
                index += 1
                if progress:
                    progress(n)
        return job.id
