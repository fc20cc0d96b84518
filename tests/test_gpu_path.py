"""The GPU path's parts that run on a CPU too: DataLoader workers, pinned-memory
loading, device-side metrics and decoding, torch.compile, and what a run records.

There is no GPU on the test machines; what needs one (bf16 autocast, channels_last,
cudnn.benchmark) is switched on only for CUDA devices, which is checked here by its
flags, and measured by bench/gpu.sh where a GPU is at hand.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from shared import shardfmt
from workers import checkpoint
from workers.device import Speedups, cpu_has_bf16
from workers.loader import ShardLoader, loader_workers
from workers.loop import Hooks, _loss, fit
from workers.models import PAD, ModelConfig, build_model, decode
from workers.synth import render_items

CFG = ModelConfig(charset="0123456789", length=4, in_height=30, in_width=80,
                  image_height=60, image_width=160)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def store() -> dict[str, bytes]:
    """Seven real shards of uneven sizes (the last group of 2 is partial)."""
    out = {}
    for i, n in enumerate((20, 20, 20, 20, 20, 13, 7)):
        items = render_items(200 + i, i * 20, n, CFG.charset, 4, 160, 60)
        out[f"sha-{i}"] = shardfmt.pack(items, {})
    return out


@pytest.fixture(scope="module")
def even_store() -> dict[str, bytes]:
    """Four shards of 16: every batch of 8 is full, so a compiled model sees one shape
    in training and one in evaluation, and compiles twice, not five times."""
    return {f"even-{i}": shardfmt.pack(render_items(300 + i, i * 16, 16, CFG.charset, 4,
                                                    160, 60), {})
            for i in range(4)}


def _loader(store: dict[str, bytes], items: int = 120, **kw) -> ShardLoader:
    return ShardLoader(list(store), store.__getitem__, CFG, 8, seed=3, mix=2, items=items,
                       **kw)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True))


def test_loader_workers_give_the_batches_of_the_training_process_epoch_after_epoch(store):
    plain = _loader(store, augment="light")
    pooled = _loader(store, augment="light", workers=2)
    try:
        for epoch in (0, 1, 2):  # the same worker processes serve every epoch
            expected = list(plain.epoch(epoch))
            assert sum(len(y) for _, y in expected) == 120
            assert _same(list(pooled.epoch(epoch)), expected), epoch
        assert pooled._dl is not None and pooled._dl.persistent_workers
        three = _loader(store, workers=3)  # more workers than a fair split of 4 groups
        assert _same(list(three.epoch(5)), list(_loader(store).epoch(5)))
        three.close()
    finally:
        pooled.close()


def test_an_epoch_left_midway_does_not_disturb_the_next_one(store):
    pooled = _loader(store, workers=2)
    try:
        it = pooled.epoch(0)
        for _ in range(3):
            next(it)
        del it  # a stop mid-epoch abandons the iterator
        assert _same(list(pooled.epoch(1)), list(_loader(store).epoch(1)))
    finally:
        pooled.close()


def test_the_pinned_memory_path_gives_the_same_batches(store):
    pinned = _loader(store, pin_memory=True)
    assert _same(list(pinned.epoch(4)), list(_loader(store).epoch(4)))


def test_loader_workers_default_to_none_off_cuda_and_some_on_cuda():
    assert loader_workers(None, CPU) == 0
    assert 1 <= loader_workers(None, torch.device("cuda")) <= 8
    assert loader_workers(3, CPU) == 3


def test_cuda_turns_every_speedup_on_and_the_cpu_bf16_only_where_the_hardware_has_it():
    on = Speedups.for_device(torch.device("cuda"))
    assert on.bf16 and on.channels_last and on.cudnn_benchmark and not on.compiled
    cpu = Speedups.for_device(CPU)
    assert cpu == (Speedups(bf16=True, channels_last=True) if cpu_has_bf16() else Speedups())
    assert Speedups.for_device(torch.device("mps"), compile=True) == Speedups(compiled=True)
    assert Speedups.for_device(CPU, precision="fp32") == Speedups()
    assert Speedups.for_device(CPU, precision="bf16") == Speedups(bf16=True, channels_last=True)
    assert not Speedups.for_device(torch.device("cuda"), precision="fp32").bf16


@pytest.mark.parametrize(("flags", "has"), [
    ("fpu sse avx avx2", False), ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu avx512f amx_tile amx_bf16 amx_int8", True), ("fpu avx512f avx512bw", False)])
def test_bf16_hardware_is_read_from_the_cpu_flags(tmp_path, flags, has):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\n")
    assert cpu_has_bf16.__wrapped__(info) is has
    assert cpu_has_bf16.__wrapped__(tmp_path / "missing") is False


class _Record(Hooks):
    """Keeps each epoch's train metrics and checkpoint; stops when ``stop()`` says so,
    keeping the interrupt's checkpoint as a run stores it (safetensors)."""

    def __init__(self, stop=None):
        self.epochs: dict[int, dict] = {}
        self.saved: list[dict] = []
        self.stop = stop

    def should_stop(self):
        return self.stop is not None and self.stop()

    def on_epoch(self, epoch, train, val, ckpt):
        self.epochs[epoch] = {"train": train, "ckpt": ckpt}

    def on_interrupt(self, ckpt):
        self.saved.append(checkpoint.loads(checkpoint.dumps(ckpt)))


def _fit(store, hooks=None, **kw):
    hooks = hooks or _Record()
    result = fit(CFG, train=kw.pop("train"), val=_loader(store, shuffle=False),
                 test=_loader(store, shuffle=False), epochs=2, lr=1e-3, seed=4, device=CPU,
                 hooks=hooks, **kw)
    return result, hooks.epochs


def test_training_with_loader_workers_gives_the_weights_of_training_without(store):
    plain, plain_epochs = _fit(store, train=_loader(store, augment="light"))
    pooled_loader = _loader(store, augment="light", workers=2)
    try:
        pooled, pooled_epochs = _fit(store, train=pooled_loader)
    finally:
        pooled_loader.close()
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, pooled.model.state_dict()[k]), k
    tr = pooled_epochs[2]["train"]
    assert tr["loader_workers"] == 2 and plain_epochs[2]["train"]["loader_workers"] == 0
    # What the loop chose for this CPU is recorded: bf16 and channels_last only where
    # the hardware computes bf16; never the CUDA-only ones.
    fast = Speedups.for_device(CPU)
    assert (tr["bf16"], tr["channels_last"], tr["cudnn_benchmark"], tr["compiled"],
            tr["pin_memory"]) == (fast.bf16, fast.channels_last, 0, 0, 0)
    assert tr["samples"] == 120 and tr["samples_per_s"] > 0


def test_a_run_with_loader_workers_stopped_mid_epoch_resumes_to_the_same_weights(store):
    from shared.errors import StopRequested

    full, _ = _fit(store, train=_loader(store, augment="light"))
    asked = {"n": 0}

    def stop_inside_epoch_2() -> bool:
        asked["n"] += 1
        return asked["n"] > 20  # epoch 1 has 15-17 batches of 8

    record = _Record(stop=stop_inside_epoch_2)
    saved = record.saved
    pooled = _loader(store, augment="light", workers=2)
    try:
        with pytest.raises(StopRequested):
            _fit(store, record, train=pooled)
        assert saved[0]["epoch"] == 1 and saved[0]["batch"] > 0
        resumed, _ = _fit(store, train=pooled, resume=saved[0])
    finally:
        pooled.close()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_a_compiled_run_checkpoints_plain_weights_that_resume_without_compiling(even_store):
    _, epochs = _fit(even_store, train=_loader(even_store, 64), compile=True)
    assert epochs[1]["train"]["compiled"] == 1
    ckpt = checkpoint.loads(checkpoint.dumps(epochs[1]["ckpt"]))
    assert set(ckpt["model"]) == set(build_model(CFG).state_dict())  # no _orig_mod.
    resumed, _ = _fit(even_store, train=_loader(even_store, 64), resume=ckpt)
    assert resumed.resumed_from == 1 and resumed.test["count"] == 64


def _greedy_by_steps(logits: torch.Tensor, length: int) -> list[list[int]]:
    """Greedy CTC read one step at a time: the textbook definition."""
    out = []
    for row in logits.argmax(-1).tolist():
        text, prev = [], 0
        for cls in row:
            if cls not in (0, prev) and len(text) < length:
                text.append(cls - 1)
            prev = cls
        out.append(text + [PAD] * (length - len(text)))
    return out


def test_vectorized_ctc_decoding_reads_as_the_step_by_step_definition():
    cfg = ModelConfig(charset="0123456789", length=6, min_length=4, in_height=30,
                      in_width=80, image_height=60, image_width=160, arch="crnn")
    g = torch.Generator().manual_seed(0)
    for blank_bias in (-2.0, 0.0, 2.0, 4.0):
        logits = torch.randn(64, 20, 11, generator=g) * 3
        logits[:, :, 0] += blank_bias
        idx, conf = decode(logits, cfg)
        assert idx.tolist() == _greedy_by_steps(logits, cfg.length)
        assert ((conf > 0) & (conf <= 1)).all()


def test_ctc_loss_on_padded_targets_equals_the_concatenated_form():
    cfg = ModelConfig(charset="0123456789", length=6, min_length=4, in_height=30,
                      in_width=80, image_height=60, image_width=160, arch="crnn")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 20, 11, generator=g)
    y = torch.randint(0, 10, (8, 6), generator=g)
    for i, k in enumerate((4, 5, 6, 4, 6, 5, 4, 6)):
        y[i, k:] = PAD
    log_probs = logits.log_softmax(-1).transpose(0, 1)
    concatenated = F.ctc_loss(log_probs, y[y != PAD] + 1, torch.full((8,), 20),
                              (y != PAD).sum(1), blank=0, zero_infinity=True)
    assert torch.equal(_loss(logits, y, cfg), concatenated)


def _train_in_worker(sqlite_env, start_worker, name: str, count: int, seed: int,
                     *train_args: str) -> dict:
    """Generate ``count`` captchas and train on them in a real prefork worker; the
    finished run as ``captrain run --json`` prints it."""
    from scheduler.cli import app

    runner = CliRunner()
    start_worker(sqlite_env, queues="cpu,gpu", concurrency=2)
    out = runner.invoke(app, ["generate", "--name", name, "--count", str(count),
                              "--shard-size", "50", "--seed", str(seed), "--wait", "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["status"] == "done", out.output
    out = runner.invoke(app, ["train", "--dataset", name, "--batch-size", "32", *train_args,
                              "--wait", "--json"])
    assert out.exit_code == 0, out.output
    run = json.loads(runner.invoke(app, ["run", str(json.loads(out.stdout)["run"]["id"]),
                                         "--json"]).stdout)
    assert run["status"] == "done", run["error"]
    return run


@pytest.mark.integration
def test_a_train_job_with_loader_workers_and_augmentation_runs_in_a_real_worker(
        sqlite_env, start_worker):
    run = _train_in_worker(sqlite_env, start_worker, "lw", 300, 2, "--epochs", "2",
                           "--loader-workers", "2", "--augment", "light")
    assert run["spec"]["augment"] == "light" and run["spec"]["loader_workers"] == 2
    assert [e["train_loader_workers"] for e in run["per_epoch"]] == [2, 2]
    assert all(e["train_samples_per_s"] > 0 for e in run["per_epoch"])


@pytest.mark.integration
def test_a_compiled_train_job_runs_in_a_real_prefork_worker(sqlite_env, start_worker):
    run = _train_in_worker(sqlite_env, start_worker, "cw", 200, 4, "--epochs", "1",
                           "--compile")
    assert run["per_epoch"][0]["train_compiled"] == 1
