"""`captrain serve` for real: uvicorn server processes on loopback ports, a real HTTP
client, bad requests one by one, the API key rule, load, and an alias moved under load."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from captcha.image import ImageCaptcha
from conftest import ROOT, Worker, _reset_process_caches, free_port, wait_for
from PIL import Image
from typer.testing import CliRunner

from scheduler.cli import app

pytestmark = pytest.mark.integration  # a real worker trains the models served
runner = CliRunner()
KEY = "k" * 8 + "-serve-test-key"
# torch (and what only training needs) made unimportable: `serve --from` needs none.
NO_TORCH = ("import sys\nfor m in ('torch', 'torchvision', 'safetensors', 'captcha'):\n"
            "    sys.modules[m] = None\n")
NOWHERE_DB = "postgresql://nobody@127.0.0.1:9/none"


# --- helpers ---------------------------------------------------------------------------

def png(text: str = "1234") -> bytes:
    buf = io.BytesIO()
    ImageCaptcha(160, 60).generate_image(text).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels and holds none (a bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((160, 60), 50).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()[:-400]


def multipart(files: list[tuple[str, bytes]], field: str = "file",
              texts: list[tuple[str, str]] = ()) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = b""
    for name, data in files:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                f'filename="{name}"\r\nContent-Type: image/png\r\n\r\n').encode() + data + b"\r\n"
    for name, value in texts:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                f"{value}\r\n").encode()
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, JSON body or text) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data.decode(errors="replace")
    finally:
        conn.close()


def read(port: int, files: list[tuple[str, bytes]], headers: dict[str, str] | None = None
         ) -> tuple[int, Any]:
    body, ctype = multipart(files)
    return call(port, "POST", "/v1/read", body, {"Content-Type": ctype, **(headers or {})})


def raw(port: int, head: bytes, body: Iterator[bytes]) -> tuple[int, Any]:
    """Send ``head`` and then ``body`` chunk by chunk until the server answers (it may
    answer and close before the body is all sent); its status and JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        try:
            for chunk in body:
                s.sendall(chunk)
        except OSError:
            pass  # the server refused the rest: its answer is waiting
        data = b""
        try:
            while not data.endswith(b"}") and (got := s.recv(65536)):
                data += got
        except OSError:
            pass
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.partition(b"\r\n\r\n")[2])


def _cli(args: list[str]) -> Any:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@contextmanager
def serving(args: list[str], env: dict[str, str], log: Path, no_torch: bool = False,
            ready: str = "/readyz") -> Iterator[int]:
    """``captrain serve ARGS`` in a process of its own on a free loopback port, until
    GET ``ready`` answers 200; yields the port."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAPTRAIN_")}
    full.update(env, PYTHONUNBUFFERED="1")
    code = ((NO_TORCH if no_torch else "") + "import sys\nfrom scheduler.cli import main\n"
            f"sys.argv = ['captrain', 'serve', *{[*args, '--port', str(port)]!r}]\nmain()\n")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=full, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited: {log.read_text()[-3000:]}")
            try:
                return call(port, "GET", ready, headers={"X-API-Key": KEY})[0] == 200
            except OSError:
                return False

        wait_for(up, timeout=90, what=f"serve {args} ready")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def hammer(port: int, requests: int, concurrency: int, files: list[tuple[str, bytes]],
           stop: threading.Event | None = None, out: list | None = None
           ) -> list[tuple[int, Any, float]]:
    """``requests`` reads over ``concurrency`` keep-alive connections (fewer if ``stop``
    is set first): (status, body, monotonic time answered) each, appended to ``out``
    as they come."""
    body, ctype = multipart(files)
    counter, lock = iter(range(requests)), threading.Lock()
    out = [] if out is None else out

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not (stop is not None and stop.is_set()):
            with lock:
                if next(counter, None) is None:
                    break
            try:
                conn.request("POST", "/v1/read", body, {"Content-Type": ctype})
                resp = conn.getresponse()
                got = (resp.status, json.loads(resp.read()), time.monotonic())
            except (OSError, http.client.HTTPException, ValueError) as exc:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                got = (0, repr(exc), time.monotonic())
            with lock:
                out.append(got)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# --- two trained versions of one model, and an export ------------------------------------

@pytest.fixture(scope="module")
def registry(redis_url: str, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[dict[str, str]]:
    """A home whose registry holds two small trained versions of one model, ``al@1``
    and ``al@2``, and an Iris classifier, trained through a real worker; its
    environment stays set for the module (the CLI reads it)."""
    import redis

    tmp = tmp_path_factory.mktemp("registry")
    env = {"CAPTRAIN_HOME": str(tmp / "home"), "CAPTRAIN_BROKER_URL": redis_url,
           "CAPTRAIN_DATABASE_URL": f"sqlite:///{tmp / 'captrain.db'}"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        _reset_process_caches()
        redis.Redis.from_url(redis_url).flushdb()
        worker = Worker(env, tmp / "worker.log", "cpu,gpu", 2)
        try:
            _cli(["generate", "--name", "al", "--count", "120", "--shard-size", "40",
                  "--seed", "4", "--wait"])
            for seed in ("1", "2"):  # two versions of one name: al@1, al@2
                run = _cli(["train", "--dataset", "al", "--epochs", "1", "--batch-size",
                            "32", "--seed", seed, "--wait"])
                assert run["status"] == "done", run
            # and a model that reads no images
            run = _cli(["train", "--dataset", "iris", "--model", "logreg", "--wait"])
            assert run["status"] == "done", run
        finally:
            worker.stop()
        yield env
    _reset_process_caches()


@pytest.fixture(scope="module")
def folder(registry: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """al@1 exported by the real exporter (`captrain export --format onnx`)."""
    out = tmp_path_factory.mktemp("export") / "al1"
    result = runner.invoke(app, ["export", "al@1", "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


# --- a served folder, without torch or a database ---------------------------------------

@pytest.fixture(scope="module")
def served(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`serve --from` with torch unimportable and the database URL pointing nowhere."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {"CAPTRAIN_DATABASE_URL": NOWHERE_DB,
           "CAPTRAIN_HOME": str(tmp_path_factory.mktemp("home"))}
    with serving(["--from", str(folder), "--max-images", "8", "--max-body-mib", "1"], env,
                 log, no_torch=True) as port:
        yield port


def test_a_folder_is_served_without_torch_and_without_a_database(served, folder):
    status, body = read(served, [("a.png", png("1234")), ("b.png", png("9876"))])
    assert status == 200, body
    assert body["model"] == "al@1"
    assert [r["file"] for r in body["results"]] == ["a.png", "b.png"]
    for r in body["results"]:
        assert len(r["text"]) == 4 and r["text"].isdigit() and 0 < r["confidence"] <= 1
    b64 = [base64.b64encode(png("5555")).decode()]
    status, body = call(served, "POST", "/v1/read", json.dumps({"images": b64}).encode(),
                        {"Content-Type": "application/json"})
    assert status == 200 and body["results"][0]["file"] == 0, body
    assert call(served, "GET", "/healthz") == (200, {"status": "ok"})
    assert call(served, "GET", "/readyz") == (200, {"status": "ready", "model": "al@1"})
    meta = json.loads((folder / "captrain.json").read_text())
    status, body = call(served, "GET", "/v1/models")
    assert status == 200 and body["models"] == [{
        "ref": str(folder), "model": "al@1", "arch": "multihead",
        "input": {"height": meta["input"]["height"], "width": meta["input"]["width"],
                  "channels": 1}, "charset": "0123456789", "length": 4, "decoding": "fixed"}]
    status, page = call(served, "GET", "/docs")
    assert status == 200 and "swagger" in page.lower()
    status, spec = call(served, "GET", "/openapi.json")
    assert status == 200 and "/v1/read" in spec["paths"]


def test_the_server_reads_what_onnxruntime_reads_from_the_same_pixels(served, folder):
    """The answer is the model's argmax over Pillow's grey, bilinear-resized input."""
    import onnxruntime as ort

    size = json.loads((folder / "captrain.json").read_text())["input"]
    data = png("4711")
    im = Image.open(io.BytesIO(data)).convert("RGB").convert("L")
    im = im.resize((size["width"], size["height"]), Image.Resampling.BILINEAR)
    x = np.asarray(im, np.float32)[None, None] / 255
    scores = ort.InferenceSession(str(folder / "model.onnx")).run(None, {"image": x})[0][0]
    e = np.exp(scores - scores.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    want = "".join("0123456789"[i] for i in probs.argmax(-1))
    status, body = read(served, [("x.png", data)])
    assert status == 200 and body["results"][0]["text"] == want
    assert body["results"][0]["confidence"] == pytest.approx(float(probs.max(-1).prod()),
                                                             abs=1e-4)


def test_one_bad_image_gets_its_own_error_and_the_others_are_read(served):
    status, body = read(served, [("good.png", png()), ("notes.txt", b"not an image"),
                                 ("bomb.png", png_header_only(50_000, 50_000))])
    assert status == 200, body
    good, text, bomb = body["results"]
    assert good["text"] and "error" not in good
    assert "notes.txt: not a readable image" in text["error"] and "BytesIO" not in text["error"]
    assert bomb["error"].startswith("bomb.png: not a readable image")
    assert "decompression bomb" in bomb["error"]


def _json(doc: Any) -> tuple[bytes, dict[str, str]]:
    return json.dumps(doc).encode(), {"Content-Type": "application/json"}


def _form(files: list[tuple[str, bytes]], field: str = "file",
          texts: list[tuple[str, str]] = ()) -> tuple[bytes, dict[str, str]]:
    body, ctype = multipart(files, field, list(texts))
    return body, {"Content-Type": ctype}


# (id, method, path, body and headers, status, words of the error). The server runs with
# --max-images 8 --max-body-mib 1; each row is also a row of docs/bad-inputs.md.
BAD = [
    ("empty-body", "POST", "/v1/read", (b"", {"Content-Type": "application/json"}), 400,
     "body is empty"),
    ("no-body-no-type", "POST", "/v1/read", (None, {}), 415, "Content-Type '(none)'"),
    ("not-an-image", "POST", "/v1/read", _form([("a.txt", b"hello")]), 422,
     "no image could be read: a.txt: not a readable image"),
    ("truncated-png", "POST", "/v1/read", _form([("t.png", truncated_png())]), 422,
     "t.png: image is truncated or corrupt"),
    ("bomb-header", "POST", "/v1/read", _form([("b.png", png_header_only(50_000, 50_000))]),
     422, "b.png: not a readable image (Image size (2500000000 pixels) exceeds limit"),
    ("beyond-pixel-limit", "POST", "/v1/read", _form([("p.png", png_header_only(7000, 7000))]),
     422, "p.png: 7000x7000 pixels is beyond the 40000000 pixel limit"),
    ("broken-base64", "POST", "/v1/read", _json({"images": ["iVBOR!!"]}), 422,
     "image 0: broken base64"),
    ("image-not-a-string", "POST", "/v1/read", _json({"images": [42]}), 422,
     "image 0: not a base64 string (int)"),
    ("json-without-images", "POST", "/v1/read", _json({"files": []}), 400,
     'needs "images"'),
    ("images-not-a-list", "POST", "/v1/read", _json({"images": "iVBOR"}), 400,
     '"images" must be a list of base64 strings, not str'),
    ("images-empty", "POST", "/v1/read", _json({"images": []}), 400, '"images" is empty'),
    ("invalid-json", "POST", "/v1/read", (b"{images:", {"Content-Type": "application/json"}),
     400, "not valid JSON"),
    ("too-many-images-json", "POST", "/v1/read", _json({"images": ["aGk="] * 9}), 400,
     "too many images: 9 in one request, at most 8"),
    ("too-many-files", "POST", "/v1/read", _form([(f"{i}.png", b"x") for i in range(9)]), 400,
     "too many images: more than 8 `file` fields in one request"),
    ("no-file-field", "POST", "/v1/read", _form([("a.png", b"x")], field="image"), 400,
     "no `file` field"),
    ("file-field-as-text", "POST", "/v1/read", _form([], texts=[("file", "hello")]), 400,
     "holds text, not a file upload"),
    ("multipart-without-boundary", "POST", "/v1/read",
     (b"--x\r\n", {"Content-Type": "multipart/form-data"}), 400,
     "the multipart body cannot be read: Missing boundary"),
    ("wrong-content-type", "POST", "/v1/read", (b"hello", {"Content-Type": "text/plain"}), 415,
     "Content-Type 'text/plain' is not read"),
    ("unknown-route", "GET", "/v2/nothing", (None, {}), 404, "no route /v2/nothing"),
    ("wrong-method", "GET", "/v1/read", (None, {}), 405, "GET is not allowed on /v1/read"),
    ("wrong-method-models", "DELETE", "/v1/models", (None, {}), 405, "DELETE is not allowed"),
    ("oversized-body", "POST", "/v1/read",
     _form([("big.png", b"\0" * (2**20 + 10))]), 413, "beyond the 1 MiB limit"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_each_bad_request_gets_one_clear_4xx_json_answer_and_the_server_goes_on(served, case):
    _, method, path, (body, headers), status, words = case
    got, answer = call(served, method, path, body, headers)
    assert got == status, answer
    assert isinstance(answer, dict) and words in answer["error"], answer
    assert read(served, [("ok.png", png())])[0] == 200


def test_a_body_beyond_the_limit_is_refused_from_its_headers_or_as_it_streams(served):
    head = (b"POST /v1/read HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    # Content-Length beyond the limit: refused before any body is read.
    status, answer = raw(served, head + f"Content-Length: {50 * 2**20}\r\n\r\n".encode(),
                         iter([b"{" * 65536] * 4))
    assert status == 413 and "bytes is beyond the 1 MiB limit" in answer["error"]
    # Chunked, no length: refused once more than the limit has arrived.
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    status, answer = raw(served, head + b"Transfer-Encoding: chunked\r\n\r\n",
                         iter([chunk] * 40))
    assert status == 413 and "request body is beyond the 1 MiB limit" in answer["error"]
    assert read(served, [("ok.png", png())])[0] == 200


def test_metrics_count_requests_batches_and_images(served):
    read(served, [("a.png", png()), ("b.txt", b"no")])
    call(served, "GET", "/v2/unknown")
    status, text = call(served, "GET", "/metrics")
    assert status == 200
    assert 'captrain_serve_requests_total{route="/v1/read",status="200"}' in text
    assert 'captrain_serve_requests_total{route="other",status="404"}' in text
    assert "captrain_serve_request_seconds_bucket" in text
    assert "captrain_serve_batch_images_bucket" in text
    assert 'captrain_serve_images_total{outcome="error"}' in text
    assert 'captrain_serve_model_info{model="al@1"' in text


def test_2000_requests_at_concurrency_32_get_no_errors(served):
    t0 = time.monotonic()
    answers = hammer(served, 2000, 32, [("a.png", png("2468"))])
    took = time.monotonic() - t0
    print(f"2000 requests at concurrency 32 in {took:.1f} s ({2000 / took:.0f}/s)")
    assert len(answers) == 2000
    assert [a for a in answers if a[0] != 200] == []
    assert {a[1]["results"][0]["text"] for a in answers} == {answers[0][1]["results"][0]["text"]}
    _, text = call(served, "GET", "/metrics")
    sizes = [line for line in text.splitlines()
             if line.startswith("captrain_serve_batch_images_count")]
    assert sizes, text  # batches were counted; more images than model calls below
    calls = float(sizes[0].split()[-1])
    assert calls < 2000, f"{calls} model calls for 2000 images: nothing was batched"


# --- the API key --------------------------------------------------------------------------

def test_binding_beyond_loopback_without_a_key_is_refused(folder, monkeypatch):
    monkeypatch.delenv("CAPTRAIN_SERVE_API_KEY", raising=False)
    from shared.settings import get_settings

    get_settings.cache_clear()
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        result = runner.invoke(app, ["serve", "--from", str(folder), "--host", host])
        assert result.exit_code == 3, result.output
        assert result.output.startswith("error: captrain serve would be open to the network "
                                        f"on {host}: set CAPTRAIN_SERVE_API_KEY")
        assert len(result.output.strip().splitlines()) == 1
    monkeypatch.setenv("CAPTRAIN_SERVE_API_KEY", "short")
    get_settings.cache_clear()
    result = runner.invoke(app, ["serve", "--from", str(folder)])
    assert result.exit_code == 3 and "CAPTRAIN_SERVE_API_KEY" in result.output
    get_settings.cache_clear()


def test_the_key_is_a_secret_shown_as_stars(monkeypatch):
    from shared.settings import load_settings

    monkeypatch.setenv("CAPTRAIN_SERVE_API_KEY", KEY)
    assert load_settings().redacted()["serve_api_key"] == "***"
    assert KEY not in repr(load_settings().redacted())


def test_with_a_key_every_route_but_liveness_and_metrics_needs_it(folder, tmp_path):
    env = {"CAPTRAIN_SERVE_API_KEY": KEY, "CAPTRAIN_HOME": str(tmp_path / "home"),
           "CAPTRAIN_DATABASE_URL": NOWHERE_DB}
    with serving(["--from", str(folder)], env, tmp_path / "serve.log") as port:
        image = [("a.png", png())]
        status, body = read(port, image)
        assert status == 401 and body["error"].startswith("an API key is required")
        status, body = read(port, image, {"Authorization": "Bearer " + KEY[:-1] + "x"})
        assert (status, body) == (401, {"error": "wrong API key"})
        assert read(port, image, {"X-API-Key": "nope"})[0] == 401
        assert read(port, image, {"Authorization": "Basic " + KEY})[0] == 401
        assert read(port, image, {"Authorization": "Bearer " + KEY})[0] == 200
        assert read(port, image, {"X-API-Key": KEY})[0] == 200
        for path in ("/readyz", "/v1/models", "/docs", "/openapi.json", "/nothing"):
            assert call(port, "GET", path)[0] == 401, path
        assert call(port, "GET", "/healthz")[0] == 200
        assert call(port, "GET", "/metrics")[0] == 200


def test_a_folder_the_server_cannot_feed_is_refused_in_one_line(folder, tmp_path):
    import shutil

    audio = Path(shutil.copytree(folder, tmp_path / "audio"))
    meta = json.loads((audio / "captrain.json").read_text())
    meta["input"].update(modality="audio", preprocess="logmel")
    (audio / "captrain.json").write_text(json.dumps(meta))
    for target, words in ((audio, "reads audio input"), (tmp_path / "none", "no captrain.json")):
        result = runner.invoke(app, ["serve", "--from", str(target)])
        assert result.exit_code == 3 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2 and "--model REF or --from DIR" in result.output


def test_a_reference_the_server_cannot_serve_is_refused_in_one_line(registry):
    for ref, code, words in (("iris", 3, "classifies Iris rows"),
                             ("nothing", 4, "no trained model named 'nothing'"),
                             ("al@9", 4, "model al has no version 9"),
                             ("al@", 2, "a version or an alias goes after '@'")):
        result = runner.invoke(app, ["serve", "--model", ref])
        assert result.exit_code == code and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


# --- decoding and batching, without a server --------------------------------------------

def test_fixed_and_ctc_scores_decode_with_their_confidences():
    from workers.serving.runner import ModelInfo, decode_scores

    def info(decoding: str, length: int) -> ModelInfo:
        return ModelInfo("r", "m@1", "abc", length, decoding, 1, 1, "image", "scores", "x")

    def logits(rows: list[list[float]]) -> np.ndarray:
        return np.log(np.asarray([rows], dtype=np.float32))

    fixed = logits([[0.1, 0.8, 0.1], [0.6, 0.2, 0.2]])
    ((text, conf),) = decode_scores(fixed, info("fixed", 2))
    assert text == "ba" and conf == pytest.approx(0.8 * 0.6)
    # ctc: blank, a, a, blank, a, c -> "aac"; kept steps 1, 4, 5
    ctc = logits([[0.9, 0.05, 0.03, 0.02], [0.1, 0.7, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1],
                  [0.5, 0.2, 0.2, 0.1], [0.1, 0.8, 0.05, 0.05], [0.1, 0.1, 0.1, 0.7]])
    ((text, conf),) = decode_scores(ctc, info("ctc", 4))
    assert text == "aac" and conf == pytest.approx(0.7 * 0.8 * 0.7)
    ((text, conf),) = decode_scores(ctc, info("ctc", 2))  # at most `length` characters
    assert text == "aa" and conf == pytest.approx(0.7 * 0.8)


class _FakeRunner:
    def __init__(self, label: str) -> None:
        self.label = label
        self.calls: list[int] = []

    def run(self, x: np.ndarray) -> list[tuple[str, float]]:
        time.sleep(0.01)
        self.calls.append(len(x))
        return [(f"{self.label}:{int(v)}", 1.0) for v in x[:, 0, 0]]


def test_concurrent_jobs_share_batches_of_one_runner_each():
    import asyncio

    from workers.serving.batcher import Batcher

    old, new = _FakeRunner("old"), _FakeRunner("new")
    batcher = Batcher(max_batch=8, max_wait=0.005)

    async def main() -> list[list[tuple[str, float]]]:
        jobs = [batcher.read(old if i < 10 else new, np.full((3, 1, 1), i, np.float32))
                for i in range(20)]
        return await asyncio.gather(*jobs)

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    for i, res in enumerate(results):
        assert res == [(f"{'old' if i < 10 else 'new'}:{i}", 1.0)] * 3
    assert sum(old.calls) == 30 and sum(new.calls) == 30
    assert max(old.calls + new.calls) <= 8 and len(old.calls) < 10  # batched, capped
    big = _FakeRunner("big")
    batcher = Batcher(max_batch=4)
    try:
        out = asyncio.run(batcher.read(big, np.arange(10, dtype=np.float32)[:, None, None]))
    finally:
        batcher.close()
    assert [t for t, _ in out] == [f"big:{i}" for i in range(10)] and big.calls == [4, 4, 2]


# --- following an alias through the registry --------------------------------------------

def test_moving_the_alias_under_load_fails_no_request_and_the_new_version_answers(
        registry, tmp_path):
    assert runner.invoke(app, ["models", "alias", "al@1", "production"]).exit_code == 0

    cache = Path(registry["CAPTRAIN_HOME"]) / "serve"
    with serving(["--model", "al@production", "--poll-seconds", "0.5"], registry,
                 tmp_path / "serve.log") as port:
        assert call(port, "GET", "/readyz")[1]["model"] == "al@1"
        stop, answers = threading.Event(), []
        load = threading.Thread(target=hammer,
                                args=(port, 100_000, 8, [("a.png", png("1357"))], stop, answers))
        load.start()
        try:
            wait_for(lambda: len(answers) > 0 or None, timeout=30, what="load running")
            time.sleep(1.0)
            assert runner.invoke(app, ["models", "alias", "al@2", "production"]).exit_code == 0
            moved = time.monotonic()
            wait_for(lambda: call(port, "GET", "/readyz")[1].get("model") == "al@2",
                     timeout=10, interval=0.05, what="al@2 served")
            time.sleep(1.0)  # more load on the new version
        finally:
            stop.set()
            load.join()
        first_new = min(t for s, b, t in answers if s == 200 and b["model"] == "al@2")
        print(f"{len(answers)} requests; al@2 answered {first_new - moved:.2f} s after the "
              "alias moved")
        assert [a for a in answers if a[0] != 200] == []
        assert {b["model"] for _, b, _ in answers} == {"al@1", "al@2"}
        assert first_new - moved < 10
    # Each version was exported once, into the cache; a new server reuses it.
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        "al@1", "al@2"]
    stamp = (cache / "al@2" / "captrain.json").stat().st_mtime_ns
    with serving(["--model", "al@2"], registry, tmp_path / "serve2.log") as port:
        assert read(port, [("a.png", png())])[1]["model"] == "al@2"
    assert (cache / "al@2" / "captrain.json").stat().st_mtime_ns == stamp
