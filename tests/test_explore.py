"""`captrain explore iris`: statistics and plots computed by a real celery worker,
checked against the published Iris figures, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import ON_SQLITE
from PIL import Image
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from scheduler.cli import app
from shared.db import session_scope
from shared.schema import RUNNING, Analysis, AnalysisFile, Artifact, Job

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _stat(summary: dict, attribute: str, cls: str = "all") -> dict:
    [row] = [r for r in summary["stats"]
             if r["attribute"] == attribute and r["class"] == cls]
    return row


def _check_png(path: Path, min_w: int, min_h: int) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    with Image.open(io.BytesIO(data)) as im:
        im.verify()  # checks the chunks' CRCs
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # and that the pixels decode
        assert im.width >= min_w and im.height >= min_h, (path, im.size)
        # Not a blank canvas: a plot has many colours.
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 20, path
        return im.size


@pytest.mark.integration
@ON_SQLITE
def test_explore_iris_on_a_real_worker_gives_the_published_figures_and_plots(
        backend, start_worker, tmp_path):
    start_worker(backend, queues="cpu", concurrency=1)
    out = tmp_path / "iris-out"
    result = runner.invoke(app, ["explore", "iris", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)

    assert s["n"] == 150 and s["counts"] == {"setosa": 50, "versicolor": 50, "virginica": 50}
    assert s["ddof"] == 1
    # The UCI description (iris.names): min, max, mean, SD per attribute.
    sl = _stat(s, "sepal length (cm)")
    assert (sl["min"], sl["max"]) == (4.3, 7.9)
    assert sl["mean"] == pytest.approx(5.843, abs=5e-4)
    assert sl["sample_sd"] == pytest.approx(0.83, abs=5e-3)
    # R's quantile(iris$Sepal.Length): 4.3 5.1 5.8 6.4 7.9 (type 7, linear).
    assert (sl["p25"], sl["p50"], sl["p75"]) == pytest.approx((5.1, 5.8, 6.4))
    pl = _stat(s, "petal length (cm)")
    assert (pl["min"], pl["max"]) == (1.0, 6.9)
    assert pl["mean"] == pytest.approx(3.758, abs=5e-4)
    assert pl["sample_sd"] == pytest.approx(1.765, abs=5e-4)  # ddof=1; population is 1.759
    assert pl["sample_var"] == pytest.approx(pl["sample_sd"] ** 2)
    sw = _stat(s, "sepal width (cm)")
    assert (sw["min"], sw["max"]) == (2.0, 4.4)
    assert sw["mean"] == pytest.approx(3.05, abs=0.01) and sw["sample_sd"] == pytest.approx(
        0.43, abs=0.01)
    pw = _stat(s, "petal width (cm)")
    assert (pw["min"], pw["max"]) == (0.1, 2.5)
    assert pw["mean"] == pytest.approx(1.20, abs=5e-3)
    assert pw["sample_sd"] == pytest.approx(0.76, abs=5e-3)
    # Per-class means, as R's aggregate(. ~ Species, iris, mean) prints them.
    assert _stat(s, "sepal length (cm)", "setosa")["mean"] == pytest.approx(5.006)
    assert _stat(s, "sepal length (cm)", "virginica")["mean"] == pytest.approx(6.588)
    assert _stat(s, "petal length (cm)", "versicolor")["mean"] == pytest.approx(4.260)
    # R's cov(iris[, 1:4]).
    cov = s["covariance"]["matrix"]
    assert cov[0][0] == pytest.approx(0.6856935, abs=1e-6)
    assert cov[0][2] == pytest.approx(1.2743154, abs=1e-6) == pytest.approx(cov[2][0])
    assert cov[1][2] == pytest.approx(-0.3296564, abs=1e-6)
    assert cov[3][3] == pytest.approx(0.5810063, abs=1e-6)
    assert len(s["stats"]) == 4 * 4  # 4 attributes x (all + 3 species)

    assert sorted(p.name for p in out.iterdir()) == [
        "covariance.csv", "pairplot.png", "sepal-scatter.png", "stats.csv"]
    w, h = _check_png(out / "sepal-scatter.png", 400, 300)
    pw_, ph_ = _check_png(out / "pairplot.png", 600, 600)
    assert pw_ * ph_ > w * h  # the 4x4 grid is the bigger picture
    rows = list(csv.DictReader((out / "stats.csv").open()))
    assert len(rows) == 16 and "sd_sample_ddof1" in rows[0]
    first = rows[0]
    assert (first["attribute"], first["class"]) == ("sepal length (cm)", "all")
    assert float(first["mean"]) == pytest.approx(sl["mean"])
    cov_rows = list(csv.reader((out / "covariance.csv").open()))
    assert cov_rows[0][0] == "covariance_sample_ddof1" and len(cov_rows) == 5

    with session_scope() as db:
        a = db.execute(select(Analysis).where(Analysis.job_id == s["job"])).scalar_one()
        assert (a.kind, a.subject) == ("explore", "iris")
        media = dict(db.execute(select(AnalysisFile.name, Artifact.media_type)
                                .join(Artifact, Artifact.sha256 == AnalysisFile.sha256)
                                .where(AnalysisFile.analysis_id == a.id)).all())
        assert media["pairplot.png"] == "image/png" and media["stats.csv"] == "text/csv"
        assert db.get(Job, s["job"]).status == "done"

    # For people: the table says which standard deviation it is.
    people = runner.invoke(app, ["explore", "iris"])
    assert people.exit_code == 0, people.output
    assert "sd (sample, ddof=1)" in people.output and "5.8433" in people.output
    print(f"\niris sepal length: min {sl['min']} max {sl['max']} mean {sl['mean']:.4f} "
          f"sd {sl['sample_sd']:.4f}; petal length mean {pl['mean']:.4f} "
          f"sd {pl['sample_sd']:.4f}; scatter {w}x{h}, pair plot {pw_}x{ph_}")


@pytest.mark.parametrize("args, code, says", [
    (["explore", "mnist"], 2, "explore knows the dataset 'iris' only, not 'mnist'"),
    (["explore", "IRIS"], 2, "not 'IRIS'"),
    (["explore", "../iris"], 2, "not '../iris'"),
])
def test_an_unknown_dataset_name_is_one_error_line_and_writes_nothing(
        sqlite_env, tmp_path, args, code, says):
    out = tmp_path / "never"
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == code
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0]
    assert not out.exists()
    with session_scope() as db:
        assert db.execute(select(func.count()).select_from(Job)).scalar_one() == 0


def test_an_out_path_that_is_a_file_is_refused_before_any_job_is_recorded(
        sqlite_env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "below"):
        result = runner.invoke(app, ["explore", "iris", "--out", str(out)])
        assert result.exit_code == 5, result.output
        assert result.output.startswith("error: ") and "not a directory" in result.output
    assert blocker.read_text() == "not a folder"
    with session_scope() as db:
        assert db.execute(select(func.count()).select_from(Job)).scalar_one() == 0


def test_standard_deviation_and_variance_are_sample_statistics_with_linear_percentiles():
    import numpy as np

    from workers.explore import column_stats

    st = column_stats(np.array([1.0, 2.0, 3.0, 4.0]))
    assert st["sample_var"] == pytest.approx(5 / 3)  # divisor n-1 = 3, not 4
    assert st["sample_sd"] == pytest.approx((5 / 3) ** 0.5)
    # Linear interpolation between order statistics (R type 7).
    assert (st["p10"], st["p25"], st["p50"], st["p75"], st["p90"]) == pytest.approx(
        (1.3, 1.75, 2.5, 3.25, 3.7))


def test_an_explore_job_run_twice_leaves_one_analysis_with_the_same_files(sqlite_env):
    """A redelivered message (late acks) must not duplicate rows or change bytes."""
    from scheduler.analysis import plan_explore
    from workers.jobs.analyses import run_explore

    job_id = plan_explore("iris")
    first = run_explore(job_id)
    assert first is not None
    assert run_explore(job_id) is None  # the job is done: a no-op

    def files() -> dict[str, str]:
        with session_scope() as db:
            return dict(db.execute(select(AnalysisFile.name, AnalysisFile.sha256)
                                   ).all())

    before = files()
    with session_scope() as db:  # a second delivery that got past the status check
        db.execute(update(Job).where(Job.id == job_id).values(status=RUNNING))
    with session_scope() as db:
        assert db.get(Job, job_id).status == RUNNING
    assert run_explore(job_id) == first
    with session_scope() as db:
        assert db.execute(select(func.count()).select_from(Analysis)).scalar_one() == 1
        assert db.get(Job, job_id).status == "done"
    assert files() == before and len(before) == 4
