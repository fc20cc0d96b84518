"""The images of one ``POST /v1/read``: multipart ``file`` fields or a JSON list of
base64 strings, with the request's own mistakes refused as a whole (BadRequest) and
each image's mistakes kept with that image.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from workers.serving.guard import BadRequest

FORMATS = ("send multipart/form-data with one or more `file` fields, or application/json "
           '{"images": [base64, ...]}')


@dataclass
class Item:
    """One image of a request: its name (a file name, or its index) and its bytes, or
    why it has none."""

    name: str | int
    data: bytes = b""
    error: str | None = None


async def read_items(request: Request, max_images: int) -> list[Item]:
    """The request's images, at most ``max_images``. Raises BadRequest for a request
    that is malformed as a whole."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        items = await _form_items(request, max_images)
    elif ctype == "application/json":
        items = _json_items(await request.body(), max_images)
    else:
        raise BadRequest(415, f"Content-Type {ctype or '(none)'!r} is not read: {FORMATS}")
    return items


async def _form_items(request: Request, max_images: int) -> list[Item]:
    try:
        # Starlette stops at the part past these limits, before reading the rest.
        form = await request.form(max_files=max_images, max_fields=max_images)
    except HTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise BadRequest(400, f"too many images: more than {max_images} `file` "
                             "fields in one request") from exc
        raise BadRequest(400, f"the multipart body cannot be read: {exc.detail}") from exc
    try:
        fields = form.getlist("file")
        if not fields:
            raise BadRequest(400, f"no `file` field: {FORMATS}")
        items = []
        for i, field in enumerate(fields):
            if not isinstance(field, UploadFile):
                raise BadRequest(400, "a `file` field holds text, not a file upload: "
                                 "send the image as a file part (curl -F file=@img.png)")
            items.append(Item(field.filename or i, await field.read()))
        return items
    finally:
        await form.close()


def _json_items(body: bytes, max_images: int) -> list[Item]:
    if not body:
        raise BadRequest(400, f"the body is empty: {FORMATS}")
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"the body is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or "images" not in doc:
        raise BadRequest(400, 'the JSON body needs "images": a list of base64 images')
    images = doc["images"]
    if not isinstance(images, list):
        raise BadRequest(400, f'"images" must be a list of base64 strings, not '
                         f"{type(images).__name__}")
    if not images:
        raise BadRequest(400, '"images" is empty: send at least one image')
    if len(images) > max_images:
        raise BadRequest(400, f"too many images: {len(images)} in one request, at most "
                         f"{max_images}")
    return [_b64_item(i, s) for i, s in enumerate(images)]


def _b64_item(index: int, text: Any) -> Item:
    if not isinstance(text, str):
        return Item(index, error=f"image {index}: not a base64 string "
                    f"({type(text).__name__})")
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,...
        text = text.partition(",")[2]
    try:
        return Item(index, base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError) as exc:
        return Item(index, error=f"image {index}: broken base64 ({exc})")

