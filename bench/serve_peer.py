"""The peer of ``bench/serve.py``: the server a user writes around ddddocr, as
ocr_api_server does. FastAPI + uvicorn, one image per request (multipart field
``image``), ``DdddOcr(...).classification(bytes)`` on a ``--format ddddocr`` export.

    python -m bench.serve_peer DDDDOCR_DIR WORKERS PORT

WORKERS uvicorn processes (1 as a user writes it), each with its own DdddOcr.

(No ``from __future__ import annotations`` here: FastAPI reads the annotations.)
"""

import sys
from pathlib import Path

import ddddocr
import uvicorn
from fastapi import FastAPI, File, UploadFile

folder, workers, port = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ocr = ddddocr.DdddOcr(ocr=False, det=False, show_ad=False,
                      import_onnx_path=str(folder / "model.onnx"),
                      charsets_path=str(folder / "charsets.json"))
app = FastAPI()


@app.get("/ping")
def ping() -> str:
    return "pong"


# A plain def: FastAPI runs it in its thread pool, so requests overlap while
# onnxruntime runs (it releases the GIL).
@app.post("/ocr/file")
def ocr_file(image: UploadFile = File(...)) -> dict:
    return {"result": ocr.classification(image.file.read())}


if __name__ == "__main__":
    # Each process imports this module again (spawn keeps sys.argv) and builds its own.
    target = app if workers == 1 else "bench.serve_peer:app"
    uvicorn.run(target, host="127.0.0.1", port=port, workers=workers, log_level="warning",
                access_log=False)
