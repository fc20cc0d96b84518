"""Checkpoints as safetensors: tensors in the file, everything else as JSON metadata.

A checkpoint is a plain nested dict (model, optimizer, scheduler, epoch, RNG,
config). ``torch.save`` would write a pickle; loading a pickle from a shared store
can run code, so the dict is split instead: tensor leaves go into a safetensors
file under their dotted path, and the rest of the tree goes into the header as JSON
with a placeholder at each tensor. Decoding rebuilds the same dict, integer dict
keys (the optimizer's state ids) included.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.errors import ArtifactError

MEDIA_TYPE = "application/vnd.captrain.checkpoint+safetensors"
_META_KEY = "captrain"


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__t__": path}
    if isinstance(obj, dict):
        return {"__kv__": [[k, _encode(v, f"{path}.{i}", tensors)] for i, (k, v) in
                           enumerate(obj.items())]}
    if isinstance(obj, list | tuple):
        return {"__l__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__t__" in obj:
            return tensors[obj["__t__"]]
        if "__kv__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__kv__"]}
        if "__l__" in obj:
            items = [_decode(v, tensors) for v in obj["__l__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def dumps(state: dict[str, Any]) -> bytes:
    """Serialize a checkpoint dict to safetensors bytes."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "c", tensors)
    # safetensors refuses tensors that share storage; a clone per entry is cheap here.
    tensors = {k: v.clone() for k, v in tensors.items()}
    return st_save(tensors, metadata={_META_KEY: json.dumps(tree)})


def loads(data: bytes) -> dict[str, Any]:
    """Rebuild the checkpoint dict. Raises ArtifactError for malformed bytes."""
    try:
        tensors = st_load(data)
        # safetensors exposes metadata only through safe_open on a file; the header
        # layout (u64 little-endian length, then JSON) is part of its spec.
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        tree = json.loads(header["__metadata__"][_META_KEY])
        state = _decode(tree, tensors)
    except (SafetensorError, ValueError, KeyError, TypeError, OSError, RuntimeError) as exc:
        raise ArtifactError(f"checkpoint is malformed: {exc}") from exc
    if not isinstance(state, dict):
        raise ArtifactError("checkpoint is malformed: not a dict")
    return state
