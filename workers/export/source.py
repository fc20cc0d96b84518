"""What an export starts from: a stored model, loaded as ``captrain predict`` loads it,
with its identity, and items of its dataset to check the export against.

Weights load from safetensors after the artifact's sha256 checked out, as in
workers.predict: exporting never unpickles and never runs code from the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from sqlalchemy import case, select
from torch import nn

from shared.artifacts import read_verified
from shared.db import session_scope
from shared.errors import ArtifactError, InputError, SpecError, StateError
from shared.lookup import find_model
from shared.schema import DONE, Dataset, Shard
from shared.shardfmt import Item, unpack
from shared.spec import TABULAR_MODELS
from workers.codecs import decode_item
from workers.models import ModelConfig, build_model


@dataclass(frozen=True)
class StoredModel:
    """A stored model, loaded in eval mode, and where it came from."""

    model: nn.Module
    cfg: ModelConfig
    # The models row as the sidecar names it: ref, run, weights_sha256, and the
    # registry's name and version when the row has them.
    identity: dict[str, Any]
    layout_job_id: int | None  # the job whose shards hold the model's dataset

    @property
    def run_id(self) -> int:
        return int(self.identity["run"])


def check_exportable(config: dict[str, Any], fmt: str, run_id: int) -> None:
    """Refuse a model that ``fmt`` cannot carry. Raises SpecError, naming what to do."""
    if config.get("arch") in TABULAR_MODELS:
        raise SpecError(f"the model of run {run_id} classifies Iris rows; export writes "
                        "models that read images or audio clips")
    if fmt != "ddddocr":
        return
    if config.get("modality", "image") != "image":
        raise SpecError(f"the model of run {run_id} reads audio clips; ddddocr reads "
                        "images only (use --format onnx)")
    if config.get("preprocess", "resize") != "resize":
        raise SpecError(f"the model of run {run_id} reads digit photos prepared the MNIST "
                        "way (inverted, cropped, centred), which ddddocr's plain resize "
                        "does not do (use --format onnx)")


def load_stored(ref: str, fmt: str) -> StoredModel:
    """Load the model ``ref`` names (shared.lookup.find_model) for export as ``fmt``.

    Raises NotFound or SpecError for the ref, SpecError for a model ``fmt`` cannot
    carry (before its weights are read), ArtifactError for weights that fail their
    hash check or do not load.
    """
    with session_scope() as s:
        row = find_model(s, ref)
        check_exportable(row.config, fmt, row.run_id)
        blob = read_verified(s, row.weights_sha256)
        cfg = ModelConfig.from_dict(row.config)
        identity: dict[str, Any] = {"ref": ref, "run": row.run_id}
        for key in ("name", "version"):  # the registry's, where the row has them
            if getattr(row, key, None) is not None:
                identity[key] = getattr(row, key)
        identity["weights_sha256"] = row.weights_sha256
        dataset = s.get(Dataset, row.dataset_id)
        layout = dataset.layout_job_id if dataset is not None else None
    model = build_model(cfg)
    try:
        model.load_state_dict(safetensors.torch.load(blob))
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise ArtifactError(f"model of run {identity['run']} does not load: {exc}") from exc
    return StoredModel(model.eval(), cfg, identity, layout)


def dataset_items(stored: StoredModel, count: int, split: str | None = None) -> list[Item]:
    """Up to ``count`` stored items of the model's dataset in shard order: of
    ``split`` alone, or with None the test split first and then the others.

    Raises StateError when there are no such items.
    """
    query = select(Shard.sha256).where(Shard.job_id == stored.layout_job_id,
                                       Shard.status == DONE)
    query = (query.where(Shard.split == split).order_by(Shard.index) if split else
             query.order_by(case((Shard.split == "test", 0), else_=1), Shard.index))
    with session_scope() as s:
        shas = s.execute(query).scalars().all()
    items: list[Item] = []
    for sha in shas:
        if len(items) >= count:
            break
        if sha is None:  # a done shard always has its artifact; this satisfies typing
            continue
        with session_scope() as s:
            data = read_verified(s, sha)
        items.extend(unpack(data)[1])
    if not items:
        raise StateError(f"the dataset of run {stored.run_id} has no stored "
                         f"{split + ' ' if split else ''}items to check the export against")
    return items[:count]


def model_inputs(stored: StoredModel, items: list[Item]) -> torch.Tensor:
    """(n, 1, h, w) uint8 model inputs of ``items``, decoded as training decoded them.
    Raises ArtifactError for an item that does not read."""
    inputs = []
    for it in items:
        try:
            inputs.append(decode_item(it.data, stored.cfg, it.ext))
        except InputError as exc:
            raise ArtifactError(f"shard item {it.index} cannot be used: {exc}") from exc
    return torch.stack(inputs)


def dataset_inputs(stored: StoredModel, count: int) -> torch.Tensor:
    """(n, 1, h, w) uint8 model inputs, n <= ``count``: the first stored items of the
    model's dataset, test split first, decoded as training decoded them.

    Raises StateError when the dataset has no finished shards, ArtifactError for a
    shard or item that does not read.
    """
    return model_inputs(stored, dataset_items(stored, count))
