"""`captrain report RUN`: a real worker trains a tiny run and renders its report; the
page is opened in headless Chromium to prove that its images load."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import wave
from pathlib import Path

import pytest
from conftest import ON_SQLITE, _missing
from PIL import Image
from sqlalchemy import func, select
from typer.testing import CliRunner

from scheduler.cli import app
from shared.db import session_scope
from shared.schema import Analysis, Job
from shared.shardfmt import Item

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ok(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _decode_png(data: bytes) -> Image.Image:
    assert data.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _chromium() -> str:
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found is None:
        _missing("chromium (apt-get install chromium)", FileNotFoundError("chromium"))
    return str(found)


def _browse(page: Path, profile: Path, *extra: str) -> str:
    """Run headless Chromium on ``page`` with ``extra`` flags; return its stdout."""
    argv = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
            "--virtual-time-budget=5000", *extra, page.as_uri()]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _images_loaded(folder: Path, tmp_path: Path) -> str:
    """The page's own verdict on its images, "k/n", as Chromium's DOM shows it."""
    dom = _browse(folder / "index.html", tmp_path / "chromium-dom", "--dump-dom")
    m = re.search(r'<body[^>]*data-images-loaded="(\d+/\d+)"', dom)
    assert m, dom[:2000]
    return m.group(1)


def _screenshot_is_not_blank(folder: Path, tmp_path: Path) -> tuple[int, int]:
    shot = tmp_path / "screenshot.png"
    _browse(folder / "index.html", tmp_path / "chromium-shot", "--window-size=1280,1800",
            f"--screenshot={shot}")
    im = _decode_png(shot.read_bytes()).convert("RGB")
    colours = im.getcolors(1 << 22) or []
    white = sum(n for n, c in colours if c == (255, 255, 255))
    # A page of plots and captchas: many colours, and far from all white.
    assert len(colours) > 200 and white < 0.9 * im.width * im.height, (len(colours), white)
    return len(colours), white


@pytest.mark.integration
@ON_SQLITE
def test_a_report_of_a_trained_run_renders_with_every_image_loaded_in_chromium(
        backend, start_worker, tmp_path):
    _chromium()  # before the slow part: skip (or fail under CI) at once without it
    start_worker(backend, queues="cpu,gpu", concurrency=2)
    gen = _ok(["generate", "--name", "report-tiny", "--count", "160", "--shard-size", "40",
               "--seed", "5", "--wait", "--json"])
    assert gen["status"] == "done"
    trained = _ok(["train", "--dataset", "report-tiny", "--epochs", "2", "--batch-size", "32",
                   "--wait", "--json"])
    run = trained["run"]
    out = tmp_path / "report"
    rep = _ok(["report", str(run["id"]), "--out", str(out), "--json"])

    assert sorted(rep["files"]) == ["confusion.png", "curves.png", "grid.png", "index.html",
                                    "summary.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(rep["files"])
    test_count = sum(s["count"] for s in _ok(["job", str(gen["id"]), "--json"])["shard_list"]
                     if s["split"] == "test")
    assert rep["evaluated"] == rep["test_items"] == test_count == 16
    assert rep["epochs"] == 2 and rep["grid"] is True
    assert rep["equal_length"] + rep["length_mismatch"] == rep["evaluated"]
    assert len(rep["per_position_acc"]) == 4
    # The report reads the test split with the stored model, as training's test pass
    # did with the live one: the same images through the same transform.
    assert rep["seq_acc"] == pytest.approx(run["test"]["seq_acc"], abs=1e-9)
    assert rep["char_acc"] == pytest.approx(run["test"]["char_acc"], abs=1e-9)
    assert rep["per_position_acc"] == pytest.approx(run["test"]["per_position"], abs=1e-9)
    assert rep["test_metrics"]["seq_acc"] == pytest.approx(run["test"]["seq_acc"])

    summary = json.loads((out / "summary.json").read_text())
    mats = summary["confusion"]["matrices"]
    assert len(mats) == 4 and summary["confusion"]["chars"].startswith("0123456789")
    assert all(sum(map(sum, m)) == rep["equal_length"] for m in mats)
    diag = [sum(m[i][i] for i in range(len(m))) for m in mats]
    assert [d / rep["equal_length"] for d in diag] == pytest.approx(rep["per_position_acc"])

    sizes = {}
    for name in ("curves.png", "grid.png", "confusion.png"):
        im = _decode_png((out / name).read_bytes())
        assert im.width >= 600 and im.height >= 250, (name, im.size)
        sizes[name] = im.size
    page = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(srcs) == ["confusion.png", "curves.png", "grid.png"]  # relative links
    assert f"run {run['id']} on report-tiny" in page

    assert _images_loaded(out, tmp_path) == "3/3"
    colours, _ = _screenshot_is_not_blank(out, tmp_path)

    # A page whose image is missing says so: the check above can fail.
    (out / "grid.png").rename(out / "moved.png")
    assert _images_loaded(out, tmp_path) == "2/3"

    people = runner.invoke(app, ["report", str(run["id"]), "--out", str(tmp_path / "again")])
    assert people.exit_code == 0, people.output
    assert "seq_acc" in people.output and "index.html" in people.output
    with session_scope() as db:
        # This run's reports only: a session's PostgreSQL database holds other tests' too.
        assert db.execute(select(func.count()).select_from(Analysis)
                          .where(Analysis.kind == "report",
                                 Analysis.subject == f"run {run['id']}")).scalar_one() == 2
    print(f"\nreport of run {run['id']}: {rep['evaluated']} test items, seq_acc "
          f"{rep['seq_acc']:.4f}, char_acc {rep['char_acc']:.4f}; PNG sizes {sizes}; "
          f"screenshot {colours} colours")


@pytest.mark.integration
def test_a_report_of_an_unfinished_run_is_one_error_line_and_records_no_job(
        sqlite_env, start_worker, tmp_path):
    start_worker(sqlite_env, queues="cpu", concurrency=1)  # no gpu worker: training waits
    _ok(["generate", "--name", "waits", "--count", "40", "--shard-size", "20", "--wait",
         "--json"])
    result = runner.invoke(app, ["train", "--dataset", "waits", "--epochs", "1", "--json"])
    assert result.exit_code == 0, result.output
    [run] = _ok(["runs", "--json"])
    run_id = run["id"]
    assert run["status"] == "pending"
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(run_id), "--out", str(out)])
    assert result.exit_code == 7
    assert result.output.strip() == (f"error: run {run_id} is pending; a report needs a "
                                     "finished run")
    assert not out.exists()
    with session_scope() as db:
        assert db.execute(select(func.count()).select_from(Job)
                          .where(Job.kind == "report")).scalar_one() == 0


@pytest.mark.parametrize("args, code, says", [
    (["report", "987654"], 4, "no run 987654"),
    (["report", "abc"], 4, "run id 'abc' is not a positive number"),
    (["report", "1.5"], 4, "run id '1.5' is not a positive number"),
    (["report", "1", "--limit", "0"], 2, "--limit must be between 1 and 100000"),
])
def test_bad_report_arguments_print_one_error_line_and_record_no_job(
        sqlite_env, tmp_path, args, code, says):
    out = tmp_path / "report"
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0]
    assert not out.exists()
    with session_scope() as db:
        assert db.execute(select(func.count()).select_from(Job)).scalar_one() == 0


def test_a_report_out_path_that_is_a_file_is_refused(sqlite_env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    result = runner.invoke(app, ["report", "1", "--out", str(blocker)])
    assert result.exit_code == 5 and "not a directory" in result.output
    assert blocker.read_text() == "keep me"


def _wav(samples: list[int], rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(s.to_bytes(2, "little", signed=True) for s in samples))
    return buf.getvalue()


def test_a_report_of_audio_items_has_curves_and_confusion_but_no_grid(tmp_path):
    from workers.report import build_report

    items = [Item(i, label, _wav([(i * 97 + k * 31) % 2000 - 1000 for k in range(800)]),
                  "wav") for i, label in enumerate(["12", "34", "56", "78", "90", "1"])]
    preds = [("12", 0.9), ("35", 0.4), ("56", 0.8), ("7", 0.2), ("90", 0.7), ("1", 0.9)]
    metrics = [{"epoch": e, "split": sp, "name": n, "value": v}
               for e in (1, 2) for sp in ("train", "val")
               for n, v in (("loss", 1.0 / e), ("char_acc", 0.4 * e), ("seq_acc", 0.3 * e))]
    rep = build_report(run_id=9, dataset="spoken", kind="audio", charset="0123456789",
                       epochs=2, metrics=metrics, items=items, predictions=preds,
                       test_items=6)
    assert sorted(rep.files) == ["confusion.png", "curves.png", "index.html", "summary.json"]
    s = rep.summary
    assert s["grid"] is False
    assert s["length_mismatch"] == 1 and s["equal_length"] == 5  # "78" read as "7"
    assert s["seq_acc"] == pytest.approx(4 / 6)
    # Position 1 counts the five equal-length pairs; position 2 only the four of
    # length two ("1" has no second character).
    m1, m2 = s["confusion"]["matrices"]
    assert sum(map(sum, m1)) == 5 and sum(map(sum, m2)) == 4
    chars = s["confusion"]["chars"]
    assert m2[chars.index("4")][chars.index("5")] == 1  # "34" read as "35"
    assert s["per_position_acc"] == pytest.approx([1.0, 3 / 4])
    for name in ("curves.png", "confusion.png"):
        _decode_png(rep.files[name])
    assert "grid.png" not in rep.files["index.html"].decode()

    for name, data in rep.files.items():
        (tmp_path / name).write_bytes(data)
    assert _images_loaded(tmp_path, tmp_path) == "2/2"
