"""Audio captchas: seeded WAV synthesis, the log-mel front end, and generate -> train ->
predict across two real workers."""

from __future__ import annotations

import io
import json
import wave

import pytest
import torch
from captcha.audio import AudioCaptcha
from conftest import ON_POSTGRES
from sqlalchemy import select
from typer.testing import CliRunner

from scheduler.cli import app
from shared.db import session_scope
from shared.errors import InputError
from shared.schema import Shard
from workers.audio import clip_frames, log_mel, mel_filterbank, read_wav
from workers.synth import render_audio_items

runner = CliRunner()


def test_audio_shards_render_the_same_bytes_from_the_same_seed():
    a = render_audio_items(7, 0, 3, "0123456789", 4)
    b = render_audio_items(7, 0, 3, "0123456789", 4)
    c = render_audio_items(8, 0, 3, "0123456789", 4)
    assert [(i.label, i.data) for i in a] == [(i.label, i.data) for i in b]
    assert [i.data for i in a] != [i.data for i in c]
    with wave.open(io.BytesIO(a[0].data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 1)
    assert all(i.ext == "wav" and len(i.label) == 4 for i in a)


def test_variable_length_texts_cover_the_whole_range():
    items = render_audio_items(1, 0, 30, "0123456789", 6, min_length=4)
    assert {len(i.label) for i in items} == {4, 5, 6}


def test_a_clip_becomes_a_log_mel_image_with_silence_padding():
    clip = bytes(AudioCaptcha().generate("1234"))
    samples, rate = read_wav(clip)
    assert rate == 8000 and samples.abs().max() <= 1
    frames = clip_frames(4, 8000, 320)
    spec = log_mel(samples, rate, 8000, 32, 320, frames)
    assert spec.shape == (1, 32, frames) and spec.dtype == torch.uint8
    used = len(samples) // 320
    speech = spec[0, :, : used - 2]
    assert speech.max() == 255 and speech.float().mean() > 50  # speech and noise
    assert spec[0, :, used + 2 :].max() == 0  # padding is silence (-80 dB)
    fb = mel_filterbank(32, 8000, 640)
    assert fb.shape == (32, 321) and torch.all(fb.sum(1) > 0)


@pytest.mark.parametrize("data", [b"", b"RIFF", b"not a wav at all" * 10])
def test_bytes_that_are_not_a_wav_are_refused_by_name(data):
    with pytest.raises(InputError, match=r"clip\.wav: not a readable WAV"):
        read_wav(data, "clip.wav")


def test_audio_generation_refuses_characters_without_voices(sqlite_env):
    result = runner.invoke(app, ["generate", "--kind", "audio", "--name", "a", "--count",
                                 "10", "--shard-size", "5", "--charset", "abc"])
    assert result.exit_code == 2
    assert "audio captchas have voices for digits and A-Z only" in result.output


@pytest.mark.integration
@ON_POSTGRES
def test_audio_captchas_across_two_workers_train_and_a_fresh_wav_is_read(
        backend, start_worker, tmp_path):
    a = start_worker(backend, queues="cpu", concurrency=1)
    b = start_worker(backend, queues="cpu,gpu", concurrency=1)
    result = runner.invoke(app, ["generate", "--kind", "audio", "--name", "talk", "--count",
                                 "160", "--shard-size", "10", "--seed", "5", "--wait",
                                 "--json"])
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    with session_scope() as s:
        makers = set(s.execute(select(Shard.worker).where(Shard.job_id == job["id"]))
                     .scalars())
    hosts = {w.split("@")[0] for w in makers}
    assert hosts == {a.name.split("@")[0], b.name.split("@")[0]}, makers

    result = runner.invoke(app, ["train", "--dataset", "talk", "--model", "crnn", "--epochs",
                                 "2", "--batch-size", "16", "--wait", "--json"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)["run"]
    test = run["test"]
    print(f"\naudio crnn, 2 epochs on 128 clips: seq_acc {test['seq_acc']:.3f}, "
          f"char_acc {test['char_acc']:.3f}")
    assert test["count"] == 16 and 0 <= test["seq_acc"] <= test["char_acc"] <= 1

    clip = tmp_path / "fresh.wav"
    AudioCaptcha().write("4071", str(clip))  # the plain package, not captrain's shards
    result = runner.invoke(app, ["predict", "--model", "talk", "--json", str(clip)])
    assert result.exit_code == 0, result.output
    read = json.loads(result.stdout)[0]
    assert set(read["text"]) <= set("0123456789") and len(read["text"]) <= 4
    assert 0 <= read["confidence"] <= 1

    png = tmp_path / "an-image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    result = runner.invoke(app, ["predict", "--model", "talk", str(png)])
    assert result.exit_code == 5 and "not a readable WAV" in result.output


def _tone_wav(n: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(torch.full((n,), 8000, dtype=torch.int16).numpy().tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("n", [1, 100, 639])
def test_a_clip_shorter_than_one_window_is_read_as_padded_with_silence(n):
    samples, rate = read_wav(_tone_wav(n), "tiny.wav")
    spec = log_mel(samples, rate, 8000, 32, 320, 40)
    assert spec.shape == (1, 32, 40) and spec[0, :, 3:].max() == 0  # silence after it


def test_a_wav_with_no_samples_is_refused_by_name():
    with pytest.raises(InputError, match=r"tiny\.wav: WAV holds no samples"):
        read_wav(_tone_wav(0), "tiny.wav")
