"""Job specs: what a user asked for, validated before anything is written.

A spec is stored as JSON on its job row, and workers rebuild it from there; the
queue message carries only ids.
"""

from __future__ import annotations

import hashlib
import string
import warnings
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.errors import SpecError

CHARSETS = {
    "digits": string.digits,
    "upper": string.ascii_uppercase,
    "lower": string.ascii_lowercase,
    "alnum": string.digits + string.ascii_uppercase + string.ascii_lowercase,
    "digits-upper": string.digits + string.ascii_uppercase,
}

# Names become part of messages, logs and tar member names: keep them plain.
S = TypeVar("S", bound=BaseModel)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
MAX_COUNT = 50_000_000
MAX_SEED = 2**63 - 1
# ImageCaptcha squeezes the text into the width; below this many pixels per
# character the glyphs overlap beyond recognition.
MIN_PX_PER_CHAR = 10


def resolve_charset(value: str) -> str:
    """Map an alias (digits, upper, lower, alnum, digits-upper) or explicit characters
    to the charset string.

    Raises SpecError for an empty charset, duplicates, whitespace, non-printable
    characters or path separators.
    """
    chars = CHARSETS.get(value, value)
    if not chars:
        raise SpecError("charset is empty")
    bad = [c for c in chars if not c.isprintable() or c.isspace() or c in "/\\"]
    if bad:
        raise SpecError(f"charset has a character that cannot be used: {bad[0]!r}")
    dup = sorted({c for c in chars if chars.count(c) > 1})
    if dup:
        raise SpecError(f"charset repeats {''.join(dup)!r}")
    return chars


def derive_seed(job_seed: int, index: int) -> int:
    """The seed of shard ``index``, a function of (job seed, shard index) only.

    Any worker, on any retry, with any number of workers, renders the same bytes.
    """
    digest = hashlib.sha256(f"captrain-shard:{job_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Split(_Spec):
    train: float = Field(0.8, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> Split:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("split fractions must add up to 1")
        if self.train <= 0:
            raise ValueError("the train fraction must be above 0")
        return self

    @classmethod
    def parse(cls, text: str) -> Split:
        """Parse ``"0.8,0.1,0.1"``. Raises SpecError."""
        try:
            parts = [float(p) for p in text.split(",")]
        except ValueError as exc:
            raise SpecError(f"split {text!r} is not three comma-separated numbers") from exc
        if len(parts) != 3:
            raise SpecError(f"split {text!r} needs three fractions: train,val,test")
        return validate(cls, train=parts[0], val=parts[1], test=parts[2])

    def counts(self, n: int) -> dict[str, int]:
        """Items per split for ``n`` items; test takes the rounding remainder."""
        train = int(n * self.train)
        val = int(n * self.val)
        out = {"train": train, "val": val, "test": n - train - val}
        for name in ("train", "val", "test"):
            if getattr(self, name) > 0 and out[name] == 0:
                raise SpecError(f"{n} items are too few to give the {name} split any")
        return out


DEFAULT_SPLIT = Split(train=0.8, val=0.1, test=0.1)


# The characters captcha's AudioCaptcha has voices for.
AUDIO_CHARS = string.digits + string.ascii_uppercase


class GenerateSpec(_Spec):
    kind: Literal["image", "audio"] = "image"
    name: Name
    count: int = Field(ge=1, le=MAX_COUNT)
    length: int = Field(ge=1, le=32)
    # Variable length: each text draws its length from min_length..length.
    min_length: int | None = Field(None, ge=1, le=32)
    charset: str
    width: int = Field(160, ge=32, le=1024)
    height: int = Field(60, ge=16, le=512)
    shard_size: int = Field(1000, ge=1, le=100_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    split: Split = Field(default_factory=lambda: DEFAULT_SPLIT)
    # How images are stored: grey PGM (what the models read) or the package's PNG.
    image_format: Literal["pgm", "png"] = "pgm"

    @field_validator("charset")
    @classmethod
    def _charset(cls, v: str) -> str:
        return resolve_charset(v)

    @model_validator(mode="after")
    def _fits(self) -> GenerateSpec:
        if self.shard_size > self.count:
            raise ValueError(f"shard size {self.shard_size} is larger than count {self.count}")
        if self.min_length is not None and self.min_length > self.length:
            raise ValueError(f"min_length {self.min_length} is above length {self.length}")
        if self.kind == "audio":
            missing = sorted(set(self.charset) - set(AUDIO_CHARS))
            if missing:
                raise ValueError(f"audio captchas have voices for digits and A-Z only, "
                                 f"not {''.join(missing)!r}")
        elif self.length * MIN_PX_PER_CHAR > self.width:
            raise ValueError(
                f"{self.length} characters do not fit in {self.width} px "
                f"(at most {self.width // MIN_PX_PER_CHAR})"
            )
        self.split.counts(self.count)
        return self


class SplitSpec(_Spec):
    """Re-shard an imported dataset into seeded train/val/test shards."""

    dataset: Name
    split: Split = Field(default_factory=lambda: DEFAULT_SPLIT)
    shard_size: int = Field(1000, ge=1, le=100_000)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # Filled in by planning: the import job whose source shards are re-split.
    source_job_id: int | None = None


# Model names, defined once: the fixed-length image models, the CTC ones and the
# tabular ones. shared.kinds says which of them each dataset kind takes.
FIXED_MODELS = ("multihead", "cnn", "lenet")
CTC_MODELS = ("crnn",)
IMAGE_MODELS = FIXED_MODELS + CTC_MODELS
TABULAR_MODELS = ("logreg", "mlp")
ModelName = Literal["multihead", "cnn", "lenet", "crnn", "logreg", "mlp"]

# The smallest model input (height, width) each image model takes, px: multihead, cnn
# and crnn halve the height four times (crnn the width twice), lenet pools twice
# after an unpadded 5x5 convolution. tests/test_models.py builds each at its minimum.
MIN_INPUT = {"multihead": (16, 16), "cnn": (16, 16), "lenet": (12, 12), "crnn": (16, 4)}
CRNN_COLUMNS_PER_STEP = 4  # an image crnn gives one CTC time step per 4 input columns


# Pydantic models are ABCs, so a field named "register" hides ABCMeta.register on the
# class, which no one calls on a spec; instances read the field as any other.
warnings.filterwarnings("ignore", message='Field name "register" in "(Train|Sweep)Spec" shadows',
                        category=UserWarning)


class TrainSpec(_Spec):
    dataset: Name
    model: ModelName = "multihead"
    epochs: int = Field(6, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=8192)
    lr: float = Field(3e-3, gt=0, le=10)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # The model sees the image scaled by this factor: 160x60 becomes 80x30, which
    # reads 4 digits as well and trains four times faster on a CPU. None: the
    # dataset kind's default (0.5 for captchas, 1 for 28x28 digits).
    scale: float | None = Field(None, gt=0.05, le=1.0)
    # Hard limit in seconds; it must stay below CAPTRAIN_VISIBILITY_TIMEOUT (12 h by
    # default), or Redis would redeliver the message while the task still runs.
    time_limit: int = Field(12 * 3600 - 600, ge=10, le=30 * 24 * 3600, description="seconds")
    # Training-time distortions of the train split (workers/augment.py): small affine
    # and jitter (light), plus warps and blur (strong); masking for audio.
    augment: Literal["none", "light", "strong"] = "none"
    # DataLoader processes that decode and augment shards. None: 0 (in the training
    # process) off CUDA, and on CUDA up to 8, leaving a core to the trainer.
    loader_workers: int | None = Field(None, ge=0, le=64)
    compile: bool = False  # torch.compile the model (minutes of compiling first)
    # auto: bf16 where the hardware computes it (CUDA; a CPU with AMX or AVX512-BF16),
    # else fp32. workers.device.Speedups.for_device says what each choice turns on.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # The accuracy preset these values came from (scheduler/presets.py), for the record.
    preset: Name | None = None
    # The model name the finished run becomes the next version of (shared.registry).
    # None: the dataset's name, which planning writes into the stored spec.
    register: Name | None = None
    # Width of the first convolution (later ones are multiples). None: the model's own.
    channels: int | None = Field(None, ge=4, le=512)
    # Set on a sweep's trials: the sweep job and the trial's number.
    sweep: int | None = Field(None, ge=1)
    trial: int | None = Field(None, ge=0)


SweepMetric = Literal["val_seq_acc", "val_char_acc", "val_loss"]


class SweepSpec(_Spec):
    """A hyperparameter search: ``trials`` train jobs, ``parallel`` at a time, drawn by
    ``sampler`` over ``space`` (``shared.space`` dimensions, as dicts), with
    ``base`` the train-spec values every trial shares."""

    dataset: Name
    trials: int = Field(8, ge=1, le=1000)
    parallel: int = Field(2, ge=1, le=64)
    metric: SweepMetric = "val_seq_acc"
    space: list[dict[str, Any]] = Field(min_length=1)
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "asha", "none"] = "median"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    base: dict[str, Any] = Field(default_factory=dict)
    # The model name the trials register as; None: DATASET-sweepID.
    register: Name | None = None


class ExploreSpec(_Spec):
    """Statistics and plots of a built-in dataset (``captrain explore``)."""

    dataset: Name  # one that shared.kinds marks explorable


REPORT_LIMIT_MAX = 100_000


class ReportSpec(_Spec):
    """A report on a finished run, or on a sweep (``captrain report``)."""

    run: int | None = Field(None, ge=1)
    sweep: int | None = Field(None, ge=1)  # instead of a run: the sweep's plots
    # Names the job in `captrain jobs`, as it does for training; filled in by planning.
    dataset: Name | None = None
    # Test items read, at most: a report is a look, not a re-evaluation of a
    # million-item test split.
    limit: int = Field(1000, ge=1, le=REPORT_LIMIT_MAX, description="test items")

    @model_validator(mode="after")
    def _one_subject(self) -> ReportSpec:
        if (self.run is None) == (self.sweep is None):
            raise ValueError("a report is on a run or on a sweep")
        return self


def default(spec: type[BaseModel], field: str) -> Any:
    """The default of ``spec``'s ``field``: what a CLI option shows and falls back to."""
    info = spec.model_fields[field]
    return info.get_default(call_default_factory=True)


def validate(cls: type[S], **values: object) -> S:
    """Build spec ``cls`` from ``values``; raise SpecError with one readable line."""
    try:
        return cls(**values)
    except SpecError:
        raise
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise SpecError(f"{where}: {msg}" if where else msg) from exc
