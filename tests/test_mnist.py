"""MNIST from IDX files: strict import checks, then train and predict through a real
worker, on test files built from a real handwritten set (see ``handwriting.py``)."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from conftest import ON_SQLITE
from handwriting import idx_images, idx_labels, photo, write_mnist
from PIL import Image
from sqlalchemy import func, select
from typer.testing import CliRunner

from scheduler.cli import app
from shared.db import session_scope
from shared.schema import Dataset, Job, Shard
from workers.digits import mnist_input

runner = CliRunner()


def _rows() -> tuple[int, int, int]:
    with session_scope() as s:
        return tuple(s.execute(select(func.count()).select_from(t)).scalar_one()
                     for t in (Job, Dataset, Shard))


def _small_set(folder, n_train=60, n_test=20, gz=False):
    rng = np.random.default_rng(0)
    from handwriting import digits

    images, labels = digits()
    pick = rng.permutation(len(images))[: n_train + n_test]
    prepared = [mnist_input(photo(images[i], size=40, margin=8)) for i in pick]
    files = {
        "train-images-idx3-ubyte": idx_images(prepared[:n_train]),
        "train-labels-idx1-ubyte": idx_labels(labels[pick[:n_train]]),
        "t10k-images-idx3-ubyte": idx_images(prepared[n_train:]),
        "t10k-labels-idx1-ubyte": idx_labels(labels[pick[n_train:]]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = folder / (name + ".gz" if gz else name)
        path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return folder


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def _wrong_magic(path, _):
    data = bytearray(path.read_bytes())
    data[:4] = struct.pack(">I", 2049)  # a labels magic on an images file
    path.write_bytes(bytes(data))


def _drop_a_label(path, _):
    data = path.read_bytes()
    n = struct.unpack(">I", data[4:8])[0]
    path.write_bytes(struct.pack(">II", 2049, n - 1) + data[8:-1])


def _not_a_digit(path, _):
    data = bytearray(path.read_bytes())
    data[8 + 5] = 11
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("train-images-idx3-ubyte", lambda p: _truncate(p, 16 + 784 * 10 + 100),
     "train-images-idx3-ubyte: truncated: the header promises 60 images"),
    ("t10k-images-idx3-ubyte", lambda p: _truncate(p, 9), "truncated header"),
    ("train-images-idx3-ubyte", lambda p: _wrong_magic(p, None),
     "train-images-idx3-ubyte: wrong magic number 2049 (a labels file)"),
    ("t10k-labels-idx1-ubyte", lambda p: _drop_a_label(p, None),
     "t10k-images-idx3-ubyte holds 20 images but"),
    ("train-labels-idx1-ubyte", lambda p: _not_a_digit(p, None), "label 11 at index 5"),
    ("train-labels-idx1-ubyte", lambda p: p.unlink(), "no train-labels-idx1-ubyte"),
])
def test_a_bad_idx_file_is_named_and_nothing_is_imported(sqlite_env, tmp_path, name, damage,
                                                           message):
    folder = _small_set(tmp_path / "mnist")
    damage(folder / name)
    before = _rows()
    result = runner.invoke(app, ["import-mnist", str(folder)])
    assert result.exit_code == 5, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert _rows() == before


def test_a_truncated_gzip_file_is_named(sqlite_env, tmp_path):
    folder = _small_set(tmp_path / "mnist", gz=True)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    result = runner.invoke(app, ["import-mnist", str(folder)])
    assert result.exit_code == 5
    assert "train-images-idx3-ubyte.gz: gzip data is truncated or corrupt" in result.output
    assert _rows() == (0, 0, 0)


def test_the_same_name_twice_is_refused_and_the_first_import_stays(sqlite_env, tmp_path):
    folder = _small_set(tmp_path / "mnist")
    first = runner.invoke(app, ["import-mnist", str(folder), "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) | {"job": 0} == {"job": 0, "dataset": "mnist",
                                                     "train": 60, "test": 20}
    before = _rows()
    again = runner.invoke(app, ["import-mnist", str(folder)])
    assert again.exit_code == 2 and "already exists" in again.output
    assert _rows() == before


def test_the_digit_preparation_centres_the_ink_by_mass_in_a_20px_box():
    page = np.full((300, 200), 240, np.uint8)
    page[40:200, 120:150] = 10  # a tall dark bar, off centre
    out = mnist_input(Image.fromarray(page))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    rows, _ = np.nonzero(out > 128)
    assert rows.max() - rows.min() + 1 == 20  # the long side fits 20 px
    ys, xs = np.indices(out.shape)
    total = out.sum()
    assert abs((ys * out).sum() / total - 14) <= 1 and abs((xs * out).sum() / total - 14) <= 1
    assert out[0, 0] == 0  # paper is background (black in MNIST)


def _digit_predictor(scale: float):
    import torch

    from workers.models import ModelConfig, build_model
    from workers.predict import Predictor

    side = round(28 * scale)  # as the train job sizes an MNIST model's input
    cfg = ModelConfig(charset="0123456789", length=1, arch="lenet", in_height=side,
                      in_width=side, image_height=28, image_width=28, preprocess="mnist")
    torch.manual_seed(0)
    return Predictor(build_model(cfg).eval(), cfg, run_id=0)


def test_stored_mnist_digits_are_read_as_training_read_them():
    """A report reads the test split's stored digits: already MNIST digits (white on
    black), not photos to prepare, so they must not go through ``mnist_input``."""
    import torch

    from scheduler.mnist import _png
    from shared import shardfmt
    from workers.codecs import decode_shard

    images, labels = _stored_digits(8)
    items = [shardfmt.Item(i, str(label), _png(img.tobytes()), "png")
             for i, (img, label) in enumerate(zip(images, labels, strict=True))]
    predictor = _digit_predictor(1.0)
    x, _ = decode_shard(shardfmt.pack(items, {}), predictor.cfg)
    assert torch.equal(x[:, 0], torch.from_numpy(np.stack(images)))  # 28x28: as stored
    assert predictor.read_items(items) == predictor._read(x)


def _stored_digits(n: int) -> tuple[list[np.ndarray], list[int]]:
    from handwriting import digits

    pixels8, target = digits()
    out = []
    for img in pixels8[:n]:  # white ink on black at 28x28, as an IDX file holds digits
        big = Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8)).resize((20, 20))
        field = np.zeros((28, 28), np.uint8)
        field[4:24, 4:24] = np.asarray(big)
        out.append(field)
    return out, [int(t) for t in target[:n]]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_a_digit_photo_is_read_at_the_models_input_size(scale):
    """``--scale`` on an MNIST dataset: the photo's 28x28 digit is resized to the
    model's input as training resized the stored digits."""
    import torch
    from handwriting import digits

    predictor = _digit_predictor(scale)
    pixels8, _ = digits()
    x = predictor._image_input(photo(pixels8[0]), "photo")
    assert x.shape == (1, round(28 * scale), round(28 * scale))
    # What is read is this input's most likely digit, with its softmax probability
    # (an untrained model: which digit does not matter, that it is this input's does).
    # With the speedups the predictor reads with (bf16 where this CPU computes it).
    cpu = torch.device("cpu")
    with torch.no_grad(), predictor.fast.autocast(cpu):
        logits = predictor.model(predictor.fast.inputs(x[None], cpu, predictor.cfg)
                                 ).float()  # (1, 1, 10)
    p = logits.softmax(-1)[0, 0]
    [(text, conf)] = predictor.read([photo(pixels8[0])])
    assert text == str(int(p.argmax())) and conf == pytest.approx(float(p.max()))
    assert 0.1 <= conf <= 1.0  # the largest of ten probabilities


@pytest.mark.integration
@ON_SQLITE
def test_mnist_files_import_train_and_predict_a_digit_not_in_them(backend, start_worker,
                                                                   tmp_path):
    held_images, held_labels = write_mnist(tmp_path / "mnist")
    out = runner.invoke(app, ["import-mnist", str(tmp_path / "mnist"), "--shard-size", "500"])
    assert out.exit_code == 0, out.output
    with session_scope() as s:
        ds = s.execute(select(Dataset).where(Dataset.name == "mnist")).scalar_one()
        splits = dict(s.execute(select(Shard.split, func.sum(Shard.count))
                                .where(Shard.job_id == ds.layout_job_id)
                                .group_by(Shard.split)).all())
    assert ds.kind == "mnist" and ds.status == "ready"
    assert splits == {"train": 1312, "val": 145, "test": 300}

    start_worker(backend, queues="gpu", concurrency=1)
    runs = {}
    for model in ("cnn", "lenet"):
        result = runner.invoke(app, ["train", "--dataset", "mnist", "--model", model,
                                     "--epochs", "4" if model == "cnn" else "6",
                                     "--lr", "0.003", "--wait", "--json"])
        assert result.exit_code == 0, result.output
        runs[model] = json.loads(result.stdout)["run"]
        test = runs[model]["test"]
        print(f"\n{model}: test accuracy {test['seq_acc']:.4f} on {test['count']} digits")
        assert test["count"] == 300 and test["seq_acc"] >= (0.9 if model == "cnn" else 0.8)
        matrix = np.array(test["confusion"][0])
        assert matrix.shape == (10, 10) and matrix.sum() == 300
        assert np.trace(matrix) / 300 == pytest.approx(test["seq_acc"])

    cnn_run = runs["cnn"]["id"]
    paths = []
    for i, (im, label) in enumerate(zip(held_images[:10], held_labels[:10], strict=True)):
        path = tmp_path / f"my_digit_{i}.png"
        photo(im, size=240, margin=90, paper=225).save(path)  # bigger, darker paper
        paths.append((path, str(label)))
    result = runner.invoke(app, ["predict", "--model", str(cnn_run), "--json",
                                 *(str(p) for p, _ in paths)])
    assert result.exit_code == 0, result.output
    read = json.loads(result.stdout)
    hits = sum(r["text"] == label for r, (_, label) in zip(read, paths, strict=True))
    print(f"held-out digit photos read right: {hits}/10")
    assert hits >= 8 and all(0 < r["confidence"] <= 1 for r in read)
