"""Serving throughput: ``captrain serve --from DIR`` against the server a user would
write around ddddocr, both serving the same exported model.

    python bench/serve.py [--model REF | --from ONNX_DIR --ddddocr DDDDOCR_DIR] [--json]

The peer (``bench/serve_peer.py``) is FastAPI + uvicorn with one image per request,
calling ``DdddOcr(ocr=False, det=False, import_onnx_path=..., charsets_path=...,
show_ad=False).classification(bytes)`` on the exporter's ``--format ddddocr`` folder
of the same model, as ocr_api_server does. captrain runs with ``--serve-args``
(default: the settings measured best on the 2-core VM); for context the bench also
measures captrain with the command's defaults and ddddocr in two processes
(``--no-context`` skips them). Each server runs in its own process(es); all are up
at once and take turns, in rounds, under the same client: threads over keep-alive
loopback connections, each request counted, a bounded number of them. The images
are held-out 4-digit captchas drawn by the plain ``captcha`` package
(``ImageCaptcha(160, 60)``).

Without ``--model`` or ``--from`` it trains a model first through the real path
(generate, then train, on local workers in a throw-away home) and exports it.
``--json`` makes the last line one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)
from bench.harness import machine  # noqa: E402

Body = tuple[bytes, str]  # (body, content type)
# The `captrain serve` settings measured best on the 2-core VM (BENCHMARKS.md):
# two processes, one onnxruntime thread each.
BEST = "--workers 2 --threads 1"


def multipart(field_name: str, files: list[tuple[str, bytes]]) -> Body:
    """A multipart/form-data body with one file part per (name, bytes)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
                     f'filename="{name}"\r\nContent-Type: image/png\r\n\r\n'.encode()
                     + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@dataclass
class Phase:
    """One measured load: what came back for each request, and how long it took."""

    name: str
    concurrency: int
    images_per_request: int
    wall: float = 0.0
    rounds: list[float] = field(default_factory=list)  # requests/s of each round
    cpu: float = 0.0  # CPU seconds the server's processes used
    latencies: list[float] = field(default_factory=list)
    texts: dict[int, list[str]] = field(default_factory=dict)  # request index -> texts
    errors: int = 0

    def figures(self, truths: list[list[str]]) -> dict[str, Any]:
        lat = sorted(self.latencies)
        n = len(lat)
        right = total = 0
        for i, texts in self.texts.items():
            want = truths[i % len(truths)]
            right += sum(a == b for a, b in zip(texts, want, strict=False))
            total += len(want)
        return {"requests": n + self.errors, "errors": self.errors,
                "requests_per_s": round(n / self.wall, 1) if self.wall else 0.0,
                "images_per_s": round(n * self.images_per_request / self.wall, 1)
                if self.wall else 0.0,
                "p50_ms": round(1000 * lat[n // 2], 2) if n else None,
                "p99_ms": round(1000 * lat[min(n - 1, int(n * 0.99))], 2) if n else None,
                "seq_acc": round(right / total, 4) if total else None,
                # Robust to a busy machine: what one image costs the server in CPU.
                "server_cpu_ms_per_image": round(1000 * self.cpu / (n * self.images_per_request),
                                                 3) if n else None,
                "round_requests_per_s": [round(r, 1) for r in self.rounds]}


def load(port: int, path: str, bodies: list[Body], requests: int, concurrency: int,
         reader: Any, phase: Phase, start: int = 0) -> Phase:
    """Send ``requests`` POSTs over ``concurrency`` threads (request i, from ``start``,
    carries ``bodies[i % len]``), adding them to ``phase`` as one round; ``reader(json)``
    gives a 200 answer's texts, None if bad."""
    counter = iter(range(start, start + requests))
    done_before = len(phase.latencies)
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body, ctype = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body, {"Content-Type": ctype})
                resp = conn.getresponse()
                data = resp.read()
                texts = reader(json.loads(data)) if resp.status == 200 else None
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                texts = None
            elapsed = time.perf_counter() - t0
            with lock:
                if texts is None:
                    phase.errors += 1
                else:
                    phase.latencies.append(elapsed)
                    phase.texts[i] = texts
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    phase.wall += wall
    phase.rounds.append((len(phase.latencies) - done_before) / wall)
    return phase


def ours_texts(doc: dict[str, Any]) -> list[str] | None:
    results = doc.get("results", [])
    return None if any("text" not in r for r in results) else [r["text"] for r in results]


def peer_texts(doc: dict[str, Any]) -> list[str] | None:
    return [doc["result"]] if "result" in doc else None


# --- set-up ----------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(argv: list[str], port: int, ready: str, log: Path) -> subprocess.Popen[bytes]:
    """Start a server process and wait until GET ``ready`` answers 200."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[:4]} exited: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", ready)
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{argv[:4]} not ready: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def held_out(n: int, charset: str, length: int, seed: int) -> list[tuple[str, bytes]]:
    """``n`` (text, PNG bytes) drawn by the plain captcha package."""
    import io

    from captcha.image import ImageCaptcha

    gen, rng = ImageCaptcha(160, 60), random.Random(seed)
    out = []
    for _ in range(n):
        text = "".join(rng.choice(charset) for _ in range(length))
        buf = io.BytesIO()
        gen.generate_image(text).save(buf, format="PNG")
        out.append((text, buf.getvalue()))
    return out


def export_both(ref: str, out: Path, quantize: str = "none") -> tuple[Path, Path]:
    """Export ``ref`` as onnx and ddddocr folders under ``out`` (the exporter's API),
    both quantized as ``quantize`` says."""
    from workers.export import export_model

    for fmt in ("onnx", "ddddocr"):
        report = export_model(ref, fmt, out / fmt, quantize=quantize)
        if q := report["verification"].get("quantization"):
            print(f"{fmt} int8: {q['seq_acc_int8']:.4f} of {q['items']} test items read "
                  f"right, fp32 {q['seq_acc_fp32']:.4f}", flush=True)
    print(f"exports in {out} (rerun with --from {out / 'onnx'} --ddddocr "
          f"{out / 'ddddocr'})", flush=True)
    return out / "onnx", out / "ddddocr"


def train(count: int, epochs: int) -> str:
    """Train a 4-digit model through the real path in a throw-away home; its run id."""
    from bench.harness import generate_then_train, isolated_home

    home = isolated_home()
    from shared.spec import GenerateSpec, TrainSpec, validate

    g = validate(GenerateSpec, name="serve-bench", count=count, length=4,
                 charset="0123456789", seed=11)
    t = validate(TrainSpec, dataset="serve-bench", epochs=epochs, seed=11)
    run_id, gen_s, train_s = generate_then_train(home, g, t)
    print(f"trained run {run_id}: generate {gen_s:.0f} s, train {train_s:.0f} s", flush=True)
    return str(run_id)


# --- the measurement -------------------------------------------------------------------

@dataclass
class Server:
    """One server measured: how it starts, where it reads, what it takes."""

    name: str
    argv: list[str]  # the port goes last
    ready: str
    path: str
    single: list[Body]
    batched: list[Body] | None
    reader: Any


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its descendants
    (``--workers`` processes), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, total = {pid}, 0.0
    for _ in range(4):  # a supervisor, its workers, and what they start
        tree |= {p for p, (parent, _) in stats.items() if parent in tree}
    for p in tree:
        total += stats.get(p, (0, 0.0))[1]
    return total


def measure(servers: list[Server], ports: dict[str, int], pids: dict[str, int],
            args: argparse.Namespace) -> dict[str, dict[str, Phase]]:
    """Warm each server up, then run each load in ``--rounds`` rounds, the servers
    taking turns within a round (a busy moment of the machine falls on all of them):
    concurrency 1 and N with one image per request, and, for the servers that take
    them, ``--batch`` images per request."""
    c, b, rounds = args.concurrency, args.batch, args.rounds
    loads = [("c1", 1, False, args.requests_c1), (f"c{c}", c, False, args.requests),
             (f"c1x{b}", 1, True, args.requests_c1 // 4),
             (f"c{c}x{b}", c, True, args.batch_requests)]
    out: dict[str, dict[str, Phase]] = {s.name: {} for s in servers}
    for s in servers:
        load(ports[s.name], s.path, s.single, 64, 4, s.reader, Phase("warm-up", 4, 1))
    for name, conc, batched, total in loads:
        for r in range(rounds):
            for s in servers[r % len(servers):] + servers[:r % len(servers)]:
                bodies = s.batched if batched else s.single
                if bodies is None:
                    continue
                phase = out[s.name].setdefault(name, Phase(name, conc, b if batched else 1))
                n = total // rounds
                before = tree_cpu(pids[s.name])
                load(ports[s.name], s.path, bodies, n, conc, s.reader, phase, start=r * n)
                phase.cpu += tree_cpu(pids[s.name]) - before
    return out


def agreement(a: Phase, b: Phase, n: int) -> float | None:
    """Share of the ``n`` distinct images both servers read the same (first reading)."""
    first_a = {i % n: t[0] for i, t in sorted(a.texts.items(), reverse=True)}
    first_b = {i % n: t[0] for i, t in sorted(b.texts.items(), reverse=True)}
    both = set(first_a) & set(first_b)
    return round(sum(first_a[i] == first_b[i] for i in both) / len(both), 4) if both else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def report(results: dict[str, dict[str, Phase]], truths: list[list[str]],
           batch_truths: list[list[str]], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and the ratios; return every figure."""
    c, b = args.concurrency, args.batch
    figures: dict[str, Any] = {"machine": machine(), "images": args.images,
                               "concurrency": c, "batch": b, "serve_args": args.serve_args}
    print(f"{'server':<16} {'load':<7} {'req/s':>7} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'errors':>6} {'seq acc':>7} {'cpu ms/img':>10}")
    for who, phases in results.items():
        figures[who] = {}
        for name, phase in phases.items():
            f = phase.figures(batch_truths if "x" in name else truths)
            figures[who][name] = f
            print(f"{who:<16} {name:<7} {f['requests_per_s']:>7} {f['images_per_s']:>7} "
                  f"{f['p50_ms']!s:>8} {f['p99_ms']!s:>8} {f['errors']:>6} "
                  f"{f['seq_acc']!s:>7} {f['server_cpu_ms_per_image']!s:>10}")
    o, p = figures["captrain"], figures["ddddocr"]
    ratios = {
        f"single_c{c}_requests_per_s": ratio(o[f"c{c}"]["requests_per_s"],
                                             p[f"c{c}"]["requests_per_s"]),
        f"batch{b}_c{c}_images_per_s": ratio(o[f"c{c}x{b}"]["images_per_s"],
                                             p[f"c{c}"]["images_per_s"]),
        # ddddocr's server CPU per image over captrain's: the throughput ratio a
        # machine with nothing else to run would show.
        f"cpu_per_image_single_c{c}": ratio(p[f"c{c}"]["server_cpu_ms_per_image"],
                                            o[f"c{c}"]["server_cpu_ms_per_image"]),
        f"cpu_per_image_batch{b}_c{c}": ratio(p[f"c{c}"]["server_cpu_ms_per_image"],
                                              o[f"c{c}x{b}"]["server_cpu_ms_per_image"]),
        "single_c1_p50": ratio(o["c1"]["p50_ms"], p["c1"]["p50_ms"]),
        "single_c1_p99": ratio(o["c1"]["p99_ms"], p["c1"]["p99_ms"]),
    }
    # Context: captrain with the command's defaults against ddddocr, and captrain
    # against ddddocr given two processes too.
    pairs = [("captrain-default", "ddddocr"), ("captrain", "ddddocr-2proc")]
    for num, den in ((n, d) for n, d in pairs if n in figures and d in figures):
        ratios[f"{num} / {den}"] = {
            f"single_c{c}_requests_per_s": ratio(figures[num][f"c{c}"]["requests_per_s"],
                                                 figures[den][f"c{c}"]["requests_per_s"]),
            f"batch{b}_c{c}_images_per_s": ratio(figures[num][f"c{c}x{b}"]["images_per_s"],
                                                 figures[den][f"c{c}"]["images_per_s"])}
    agree = agreement(results["captrain"][f"c{c}"], results["ddddocr"][f"c{c}"], args.images)
    figures["ratios"], figures["agreement"] = ratios, agree
    print(f"captrain / ddddocr, single images at concurrency {c}, requests/s: "
          f"{ratios[f'single_c{c}_requests_per_s']}x (target >= 1.5)")
    print(f"captrain with {b} images per request / ddddocr, images/s at concurrency {c}: "
          f"{ratios[f'batch{b}_c{c}_images_per_s']}x (target >= 5)")
    print(f"server CPU per image, ddddocr / captrain: single {ratios[f'cpu_per_image_single_c{c}']}"
          f"x, {b} per request {ratios[f'cpu_per_image_batch{b}_c{c}']}x")
    print(f"at concurrency 1, captrain / ddddocr: p50 {ratios['single_c1_p50']}, "
          f"p99 {ratios['single_c1_p99']}; both read {agree} of the images alike")
    for key, value in ratios.items():
        if isinstance(value, dict):
            print(f"{key}: {value}")
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a registry reference to export and serve")
    ap.add_argument("--from", dest="folder", type=Path, help="an onnx export folder")
    ap.add_argument("--ddddocr", type=Path, help="the same model's ddddocr export folder")
    ap.add_argument("--quantize", choices=("none", "int8"), default="none",
                    help="export both folders quantized (captrain export --quantize)")
    ap.add_argument("--count", type=int, default=12000, help="images to train on")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--images", type=int, default=256, help="distinct held-out images")
    ap.add_argument("--requests", type=int, default=2000, help="requests per loaded run")
    ap.add_argument("--requests-c1", type=int, default=300)
    ap.add_argument("--batch-requests", type=int, default=250)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4, help="turns the servers take per load")
    ap.add_argument("--serve-args", default=BEST,
                    help=f"`captrain serve` options (default: {BEST!r}, measured best here)")
    ap.add_argument("--no-context", action="store_true",
                    help="measure only captrain and ddddocr, not captrain's defaults and "
                    "ddddocr in 2 processes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if (args.folder is None) != (args.ddddocr is None):
        ap.error("--from and --ddddocr go together")
    out = Path(tempfile.mkdtemp(prefix="captrain-serve-bench-"))
    if args.folder is not None:
        onnx_dir, dddd_dir = args.folder.resolve(), args.ddddocr.resolve()
    else:
        onnx_dir, dddd_dir = export_both(args.model or train(args.count, args.epochs), out,
                                         args.quantize)
    meta = json.loads((onnx_dir / "captrain.json").read_text())
    images = held_out(args.images, meta["charset"], meta["length"], seed=2024)
    truths = [[t] for t, _ in images]
    groups = [images[i:i + args.batch]
              for i in range(0, len(images) - args.batch + 1, args.batch)]
    batch_truths = [[t for t, _ in g] for g in groups]

    def bodies(field: str) -> list[Body]:
        return [multipart(field, [(f"{i}.png", png)]) for i, (_, png) in enumerate(images)]

    batched = [multipart("file", [(f"{j}.png", png) for j, (_, png) in enumerate(g)])
               for g in groups]
    serve = [sys.executable, "-m", "scheduler.cli", "serve", "--from", str(onnx_dir)]
    # -m from the repository root: bench/queue.py must not shadow the stdlib's queue.
    peer = [sys.executable, "-m", "bench.serve_peer", str(dddd_dir)]
    servers = [
        Server("captrain", [*serve, *args.serve_args.split(), "--port"], "/readyz",
               "/v1/read", bodies("file"), batched, ours_texts),
        Server("ddddocr", [*peer, "1"], "/ping", "/ocr/file", bodies("image"),
               None, peer_texts),
    ]
    if not args.no_context:
        servers += [
            Server("captrain-default", [*serve, "--port"], "/readyz", "/v1/read",
                   bodies("file"), batched, ours_texts),
            Server("ddddocr-2proc", [*peer, "2"], "/ping", "/ocr/file",
                   bodies("image"), None, peer_texts),
        ]
    print(f"machine: {machine()}; model {meta['model']}; captrain serve "
          f"{args.serve_args or '(defaults)'}", flush=True)
    procs, ports = [], {}
    try:
        for server in servers:  # all up at once, idle but for the one being measured
            ports[server.name] = free_port()
            procs.append(start([*server.argv, str(ports[server.name])], ports[server.name],
                               server.ready, out / f"{server.name}.log"))
        results = measure(servers, ports, {s.name: p.pid for s, p in zip(servers, procs,
                                                                          strict=True)}, args)
    finally:
        for proc in procs:
            stop(proc)
    figures = report(results, truths, batch_truths, args)
    figures["precision"] = meta.get("precision", "fp32")  # both servers serve this model
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
