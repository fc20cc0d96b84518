from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import SpecError
from shared.spec import GenerateSpec, Split, TrainSpec, derive_seed, resolve_charset, validate

GOOD = dict(name="d4", count=100, length=4, charset="digits", shard_size=10)


def test_shard_seed_depends_only_on_job_seed_and_index():
    assert derive_seed(7, 3) == derive_seed(7, 3)
    seeds = {derive_seed(7, i) for i in range(1000)}
    assert len(seeds) == 1000
    assert derive_seed(8, 3) != derive_seed(7, 3)
    assert all(0 <= s < 2**63 for s in seeds)


def test_charset_aliases_resolve_to_their_characters():
    assert resolve_charset("digits") == "0123456789"
    assert len(resolve_charset("alnum")) == 62
    assert len(resolve_charset("digits-upper")) == 36
    assert resolve_charset("abc") == "abc"


@pytest.mark.parametrize(
    ("charset", "message"),
    [("", "empty"), ("aab", "repeats"), ("ab c", "cannot be used"), ("a\x00", "cannot be used"),
     ("a/b", "cannot be used")],
)
def test_bad_charsets_are_refused(charset, message):
    with pytest.raises(SpecError, match=message):
        resolve_charset(charset)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"count": 0}, "count"),
        ({"count": -5}, "count"),
        ({"count": 10**12}, "count"),
        ({"length": 0}, "length"),
        ({"charset": ""}, "empty"),
        ({"shard_size": -1}, "shard_size"),
        ({"shard_size": 1000}, "larger than count"),
        ({"length": 20}, "do not fit"),
        ({"width": 100000}, "width"),
        ({"height": 1}, "height"),
        ({"name": "../etc"}, "name"),
        ({"name": "x'; DROP TABLE jobs;--"}, "name"),
        ({"count": 5, "shard_size": 5}, "too few"),
        ({"image_format": "bmp"}, "image_format"),
    ],
)
def test_malformed_generate_specs_raise_one_clear_error(change, message):
    with pytest.raises(SpecError, match=message):
        validate(GenerateSpec, **{**GOOD, **change})


def test_a_valid_spec_keeps_its_values():
    spec = validate(GenerateSpec, **GOOD)
    assert spec.charset == "0123456789"
    assert spec.split.counts(spec.count) == {"train": 80, "val": 10, "test": 10}


def test_split_parsing_and_its_errors():
    assert Split.parse("0.7,0.2,0.1").val == pytest.approx(0.2)
    for bad in ("0.5,0.5", "a,b,c", "0.5,0.5,0.5", "0,0.5,0.5"):
        with pytest.raises(SpecError):
            Split.parse(bad)


def test_split_counts_add_up_to_the_total():
    for n in (10, 11, 99, 1001):
        c = Split().counts(n)
        assert sum(c.values()) == n


def test_train_spec_refuses_unknown_model_and_bad_numbers():
    for bad in ({"model": "gpt"}, {"epochs": 0}, {"lr": -1.0}, {"batch_size": 0},
                {"device": "tpu"}):
        with pytest.raises(SpecError):
            validate(TrainSpec, dataset="d4", **bad)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_split_parser_fuzz_gives_spec_error_or_a_valid_split(text):
    try:
        split = Split.parse(text)
    except SpecError:
        return
    assert abs(split.train + split.val + split.test - 1) < 1e-6


@settings(max_examples=300, deadline=None)
@given(
    name=st.text(max_size=70),
    count=st.integers(min_value=-10, max_value=10**9),
    length=st.integers(min_value=-2, max_value=40),
    charset=st.text(max_size=12),
    width=st.integers(min_value=-5, max_value=5000),
    shard_size=st.integers(min_value=-5, max_value=10**6),
)
def test_generate_spec_fuzz_gives_spec_error_or_a_consistent_spec(
    name, count, length, charset, width, shard_size
):
    try:
        spec = validate(GenerateSpec, name=name, count=count, length=length, charset=charset,
                        width=width, shard_size=shard_size)
    except SpecError as exc:
        assert "\n" not in str(exc)  # one line
        return
    assert spec.shard_size <= spec.count and spec.length * 10 <= spec.width
    assert len(set(spec.charset)) == len(spec.charset) and "/" not in spec.name
