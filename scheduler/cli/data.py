"""Datasets: synthesize, import, split into shards, list.

Option defaults are the spec's own (shared.spec), so the help shows what the spec
would fill in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from scheduler.cli.args import JsonOpt, WaitOpt, split_text
from scheduler.cli.jobs import follow
from scheduler.cli.render import console, emit, err_console
from shared.spec import GenerateSpec, Split, SplitSpec, default, validate

commands = typer.Typer()


@commands.command()
def generate(
    name: Annotated[str, typer.Option(help="Dataset name.")],
    count: Annotated[int, typer.Option(help="Number of captchas.")],
    kind: Annotated[str, typer.Option(
        help="image or audio (8 kHz WAV, digits and A-Z voices).")
    ] = default(GenerateSpec, "kind"),
    length: Annotated[int, typer.Option(help="Characters per captcha (the most).")] = 4,
    min_length: Annotated[int | None, typer.Option(
        help="Fewest characters: lengths vary from this to --length (train with crnn).")
    ] = default(GenerateSpec, "min_length"),
    charset: Annotated[str, typer.Option(
        help="digits, upper, lower, alnum, digits-upper, or the characters.")] = "digits",
    width: Annotated[int, typer.Option(
        help="Image width, px.")] = default(GenerateSpec, "width"),
    height: Annotated[int, typer.Option(
        help="Image height, px.")] = default(GenerateSpec, "height"),
    shard_size: Annotated[int, typer.Option(
        help="Captchas per shard (one task).")] = default(GenerateSpec, "shard_size"),
    seed: Annotated[int, typer.Option(
        help="Dataset seed: same seed, same bytes.")] = default(GenerateSpec, "seed"),
    split: Annotated[str, typer.Option(
        help="train,val,test fractions.")] = split_text(default(GenerateSpec, "split")),
    image_format: Annotated[str, typer.Option(
        help="pgm: grey, as the models read them, and fastest to make; "
             "png: the package's colours.")] = default(GenerateSpec, "image_format"),
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Synthesize an image or audio captcha dataset across the cpu workers."""
    from scheduler.plan import plan_generate
    from shared.dispatch import send_job

    spec = validate(GenerateSpec, name=name, count=count, kind=kind, length=length,
                    min_length=min_length, charset=charset,
                    width=width, height=height, shard_size=shard_size, seed=seed,
                    split=Split.parse(split), image_format=image_format)
    job_id, _ = plan_generate(spec)
    send_job(job_id)
    follow(job_id, wait, as_json)


@commands.command("import")
def import_(
    folder: Annotated[Path, typer.Argument(help="Folder of images named <label>.png/.jpg")],
    name: Annotated[str, typer.Option(help="Dataset name.")],
    shard_size: Annotated[int, typer.Option(
        help="Images per shard.")] = default(SplitSpec, "shard_size"),
    as_json: JsonOpt = False,
) -> None:
    """Import a folder of labelled images (the file stem is the label)."""
    from scheduler.plan import plan_import, scan_import

    validate(SplitSpec, dataset=name, shard_size=shard_size)
    total = len(scan_import(folder).files)
    with Progress(console=err_console, disable=as_json) as bar:
        task = bar.add_task(f"importing {folder}", total=total)
        job_id = plan_import(folder, name, shard_size, lambda n: bar.advance(task, n))
    if as_json:
        emit({"job": job_id, "dataset": name, "count": total}, True)
    else:
        console.print(f"imported {total} images as dataset {name} (job {job_id}); "
                      f"split it with `captrain shard --dataset {name}`")


@commands.command("import-mnist")
def import_mnist(
    folder: Annotated[Path, typer.Argument(
        help="Folder with the four MNIST IDX files, gzipped or raw.")],
    name: Annotated[str, typer.Option(help="Dataset name.")] = "mnist",
    shard_size: Annotated[int, typer.Option(
        help="Digits per shard.")] = default(SplitSpec, "shard_size"),
    val_fraction: Annotated[float, typer.Option(
        help="Tail of the train file kept as the val split.")] = 0.1,
    as_json: JsonOpt = False,
) -> None:
    """Import MNIST (train-images-idx3-ubyte ... t10k-labels-idx1-ubyte) ready to train."""
    from scheduler.mnist import plan_mnist, scan_mnist

    validate(SplitSpec, dataset=name, shard_size=shard_size)
    files = scan_mnist(folder)
    with Progress(console=err_console, disable=as_json) as bar:
        task = bar.add_task(f"importing {folder}", total=files.count)
        job_id = plan_mnist(files, folder, name, shard_size, val_fraction,
                            lambda n: bar.advance(task, n))
    if as_json:
        emit({"job": job_id, "dataset": name, "train": files.train_images.count,
              "test": files.test_images.count}, True)
    else:
        console.print(f"imported {files.train_images.count} train and "
                      f"{files.test_images.count} test digits as dataset {name} "
                      f"(job {job_id}); train it with `captrain train --dataset {name} "
                      "--model cnn`")


@commands.command()
def shard(
    dataset: Annotated[str, typer.Option(help="Imported dataset to split.")],
    split: Annotated[str, typer.Option(
        help="train,val,test fractions.")] = split_text(default(SplitSpec, "split")),
    shard_size: Annotated[int, typer.Option(
        help="Items per output shard.")] = default(SplitSpec, "shard_size"),
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = default(SplitSpec, "seed"),
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Split an imported dataset into seeded train/val/test shards on the workers."""
    from scheduler.plan import plan_split
    from shared.dispatch import send_job

    spec = validate(SplitSpec, dataset=dataset, split=Split.parse(split),
                    shard_size=shard_size, seed=seed)
    job_id, _ = plan_split(spec)
    send_job(job_id)
    follow(job_id, wait, as_json)


@commands.command()
def datasets(as_json: JsonOpt = False) -> None:
    """List datasets."""
    from scheduler.status import list_datasets

    emit(list_datasets(), as_json, None, "datasets", optional=["created", "charset"])
