"""The pipeline file (TOML): typed sections with defaults and checked values.

Sections and keys (see examples/pipelines/*.toml):
  [data]     source, task (classification | regression), label, pii, pii_action,
             test_fraction, region, parent
  [store]    path, allowed_regions (written to the store's policy.toml when the store is
             created; afterwards it must match that file, which the data owner edits)
  [model]    kind (mlp | cnn | sklearn | torch | onnx), hidden, channels (mlp, cnn),
             estimator, params (sklearn), module (torch), path, input, output (onnx)
  [train]    epochs, batch_size, lr, seed, device (auto | cpu | cuda), weight_decay, threads
  [compress] prune, finetune_epochs, quantize (none | int8), calibration_rows
  [export]   formats (onnx, tflite), check_rows
  [profile]  bins, sample_rows
  [bundle]   name, version, publisher_key, smoke_rows
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetcore import regions, tomlfile
from fleetcore.bundle import TASKS
from fleetcore.errors import InvalidInputError
from trainer.ingest import urls
from trainer.ingest.table import IMPUTE_STRATEGIES

__all__ = [
    "MODEL_KINDS",
    "BundleSettings",
    "CompressSettings",
    "DataSettings",
    "ExportSettings",
    "ModelSettings",
    "Pipeline",
    "PipelineConfigError",
    "ProfileSettings",
    "StoreSettings",
    "TrainSettings",
    "settings_digest",
]


@dataclass(frozen=True)
class DataSettings:
    source: str
    task: str = "classification"  # classification | regression
    label: str | None = None
    pii: list[str] = field(default_factory=list)
    pii_action: str = "hmac"  # hmac | drop
    test_fraction: float = 0.2
    region: str = "local"
    parent: str | None = None
    # tables as businesses have them (trainer/ingest/table.py)
    features: list[str] | None = None  # default: every column not used otherwise
    categorical: list[str] = field(default_factory=list)
    timestamp: str | None = None
    impute: dict[str, Any] = field(default_factory=dict)  # column or "*" -> strategy
    window: int | None = None  # keep only the most recent rows for training
    # SQL sources
    query: str | None = None
    table: str | None = None
    watermark: str | None = None
    password_env: str | None = None
    # HTTP JSON API sources
    records: str | None = None  # dotted path to the rows in each response ("" = the body)
    next: str | None = None  # dotted path to the next page's URL
    page_param: str | None = None  # or: a page-number query parameter
    page_start: int = 1
    headers: dict[str, Any] = field(default_factory=dict)  # value "env:NAME": from $NAME
    watermark_param: str | None = None  # query parameter that sends the last watermark
    # streams
    stream: str | None = None  # NATS JetStream stream name (default: found by subject)
    username: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    snapshot_rows: int = 10_000
    snapshot_seconds: float = 60.0
    # limits on what one read takes from a source
    max_rows: int = 1_000_000
    max_bytes: int = 256 * 1024 * 1024
    max_columns: int = 1024
    timeout_s: float = 30.0
    max_pages: int = 1000


@dataclass(frozen=True)
class StoreSettings:
    path: str = "store"  # relative to the workdir
    allowed_regions: list[str] | None = None


@dataclass(frozen=True)
class ModelSettings:
    kind: str = "mlp"  # mlp | cnn | sklearn | torch | onnx
    hidden: list[int] = field(default_factory=lambda: [128])
    channels: list[int] = field(default_factory=lambda: [16, 32])  # cnn only
    estimator: str | None = None  # sklearn: "sklearn.ensemble.HistGradientBoostingClassifier"
    params: dict[str, Any] = field(default_factory=dict)  # sklearn: the estimator's arguments
    module: str | None = None  # torch: "PATH.py:function" or "package.module:function"
    path: str | None = None  # onnx: the model file, relative to the pipeline file
    input: str | None = None  # onnx: the graph input to feed (default: its only input)
    output: str | None = None  # onnx: the graph output to serve (default: the one that fits)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    weight_decay: float = 0.0
    # CPU threads per process (0: PyTorch's default). A fixed count makes CPU results
    # bit-for-bit repeatable: with several threads the BLAS may split reductions differently
    # when the host is busy, which changes the last bits of the weights.
    threads: int = 0


@dataclass(frozen=True)
class CompressSettings:
    prune: float = 0.0  # fraction of hidden units / channels removed
    finetune_epochs: int = 2
    quantize: str = "int8"  # none | int8
    calibration_rows: int = 256


@dataclass(frozen=True)
class ExportSettings:
    formats: list[str] = field(default_factory=lambda: ["onnx"])
    check_rows: int = 200


@dataclass(frozen=True)
class ProfileSettings:
    bins: int = 10
    sample_rows: int = 500


@dataclass(frozen=True)
class BundleSettings:
    name: str = "model"
    version: int = 1
    publisher_key: str | None = None  # path to the publisher's private key (PEM)
    smoke_rows: int = 8


_SECTIONS: dict[str, type] = {
    "data": DataSettings,
    "store": StoreSettings,
    "model": ModelSettings,
    "train": TrainSettings,
    "compress": CompressSettings,
    "export": ExportSettings,
    "profile": ProfileSettings,
    "bundle": BundleSettings,
}

# The sources that need no file: scikit-learn's bundled data sets (trainer.sources loads them).
SKLEARN_SOURCES = ("digits", "wine", "breast_cancer", "diabetes")
REGRESSION_SOURCES = ("diabetes",)  # the others are classification data sets
MODEL_KINDS = ("mlp", "cnn", "sklearn", "torch", "onnx")
# The keys of [model] that only one kind reads.
_KIND_KEYS = {"estimator": "sklearn", "params": "sklearn", "module": "torch", "path": "onnx",
              "input": "onnx", "output": "onnx"}
# "sklearn.ensemble.HistGradientBoostingClassifier": a class in scikit-learn, nothing else (a
# pipeline file must not be able to import arbitrary code through this key).
_ESTIMATOR = re.compile(r"^sklearn(\.[a-z_][a-z0-9_]*)+\.[A-Z][A-Za-z0-9_]*$")
_MODULE = re.compile(r"^(?:[^:]+\.py|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)"
                     r":[A-Za-z_][A-Za-z0-9_]*$")
_PARAM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # LogisticRegression's C, say
_SNAPSHOT_ID = re.compile(r"^sha256:[0-9a-f]{64}$")
_BUNDLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_ROWS = 1_000_000


class PipelineConfigError(InvalidInputError):
    """A pipeline file that cannot be used; the message names the file, ``section.key`` and a
    hint on what to write instead."""


# What each key's TOML value must be. A float key takes an integer too (``lr = 1``).
_KIND_NAMES = {"int": "an integer", "float": "a number", "str": "a string",
               "list[int]": "a list of integers", "list[str]": "a list of strings",
               "dict": "a table"}


_VALUE_KINDS: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
    (list, "a list"), (dict, "a table"),
)


def _kind(value: Any) -> str:
    """How a TOML value reads to a person: "a string", "an integer", "a table"..."""
    for cls, name in _VALUE_KINDS:  # bool before int: a bool is an int to isinstance
        if isinstance(value, cls):
            return name
    return type(value).__name__  # dates and times


def _field_kinds(cls: type) -> dict[str, str]:
    """``int``, ``float``, ``str``, ``list[int]`` or ``list[str]`` per field (an optional
    field is simply left out of the file)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        (kind,) = [a for a in args if a is not type(None)]
        if typing.get_origin(kind) is list:
            out[name] = f"list[{typing.get_args(kind)[0].__name__}]"
        elif typing.get_origin(kind) is dict:
            out[name] = "dict"
        else:
            out[name] = kind.__name__
        if out[name] not in _KIND_NAMES:  # pragma: no cover - a new field type needs a rule
            raise TypeError(f"{cls.__name__}.{name}: no TOML rule for {hint}")
    return out


def _check_type(where: str, key: str, value: Any, kind: str) -> Any:
    """``value`` as ``kind`` (an integer widened to float), or PipelineConfigError."""
    expected = _KIND_NAMES[kind]
    ok: bool
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "dict":
        ok = isinstance(value, dict)
    else:
        item = int if kind == "list[int]" else str
        ok = isinstance(value, list) and all(
            isinstance(v, item) and not isinstance(v, bool) for v in value
        )
    if ok:
        return value
    section, _, short = key.partition(".")
    hint = ""
    if isinstance(value, str) and kind in ("int", "float"):
        hint = f" (in [{section}] write {short} = {value.strip()}, without quotes)"
    elif kind.startswith("list") and not isinstance(value, list):
        hint = f" (in [{section}] write {short} = [{_toml(value)}])"
    if isinstance(value, list) and kind.startswith("list"):
        item_kind = "an integer" if kind == "list[int]" else "a string"
        raise PipelineConfigError(
            f"{where}: {key} = {_toml(value)} holds an item that is not {item_kind}; expected "
            f"{expected}"
        )
    raise PipelineConfigError(
        f"{where}: {key} = {_toml(value)} is {_kind(value)}; expected {expected}{hint}"
    )


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{...}"
    return str(value)


def _between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Any:
    def check(v: Any) -> bool:
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        return bool(above and below)
    return check


def _one_of(*choices: str) -> Any:
    return lambda v: v in choices


def _widths(lo: int, hi: int, *, max_len: int = 64) -> Any:
    return lambda v: 0 < len(v) <= max_len and all(lo <= x <= hi for x in v)


def _source_ok(v: str) -> bool:
    scheme, sep, rest = v.partition(":")
    if not (sep and rest):
        return False
    if scheme in ("csv", "parquet"):
        return bool(rest.strip())
    if scheme == "sklearn":
        return rest in SKLEARN_SOURCES
    try:
        return urls.check_source(v) in ("sql", "http", "stream")
    except InvalidInputError:
        return False


def _names(v: list[str]) -> bool:
    return 0 < len(v) <= 4096 and len(set(v)) == len(v) and all(
        x.strip() and len(x) <= 256 for x in v)


_DOTTED = re.compile(r"^$|^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _regions_ok(v: list[str]) -> bool:
    try:
        regions.check_regions(v, "allowed_regions")
    except InvalidInputError:
        return False
    return True


# section.key -> (check on the typed value, what a good value is)
_RULES: dict[str, tuple[Any, str]] = {
    "data.source": (_source_ok, "'sklearn:NAME' (NAME one of "
                    f"{', '.join(SKLEARN_SOURCES)}), 'csv:PATH' or 'parquet:PATH' (relative to "
                    "the pipeline file), 'postgresql://USER@HOST:PORT/DB', "
                    "'mysql://USER@HOST:PORT/DB', 'https://...', 'mqtt(s)://HOST:PORT/TOPIC' or "
                    "'nats://HOST:PORT/SUBJECT', with no password in the URL (data.password_env)"),
    "data.features": (_names, "distinct column names"),
    "data.categorical": (lambda v: not v or _names(v), "distinct column names"),
    "data.timestamp": (lambda v: bool(v.strip()), "a column name"),
    "data.impute": (lambda v: len(v) <= 4096 and all(
        isinstance(x, str) and x in IMPUTE_STRATEGIES for x in v.values()),
        "a table of column (or \"*\") = \"mean\" | \"median\" | \"most_frequent\" | "
        "\"zero\" | \"none\""),
    "data.window": (_between(1, 100_000_000), "a number of rows 1..100000000"),
    "data.query": (lambda v: 0 < len(v.strip()) <= 100_000, "a SELECT statement"),
    "data.table": (lambda v: bool(re.match(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$",
                                           v)), "a table name, optionally schema.table"),
    "data.watermark": (lambda v: bool(v.strip()) and len(v) <= 256, "a column name"),
    "data.password_env": (lambda v: bool(_ENV.match(v)),
                          "the name of an environment variable, e.g. PGPASSWORD"),
    "data.records": (lambda v: bool(_DOTTED.match(v)),
                     "a dotted path to the rows in each response, e.g. \"data.items\" "
                     "(\"\" when the body is the list)"),
    "data.next": (lambda v: bool(_DOTTED.match(v)) and bool(v),
                  "a dotted path to the next page's URL, e.g. \"links.next\""),
    "data.page_param": (lambda v: bool(re.match(r"^[A-Za-z0-9_.-]{1,64}$", v)),
                        "a query parameter name, e.g. \"page\""),
    "data.page_start": (_between(0, 1_000_000), "an integer 0..1000000"),
    "data.headers": (lambda v: len(v) <= 64 and all(
        _HEADER.match(k) and isinstance(x, str) and "\n" not in x and "\r" not in x
        for k, x in v.items()),
        "a table of header = \"value\" (or \"env:NAME\" to read it from $NAME)"),
    "data.watermark_param": (lambda v: bool(re.match(r"^[A-Za-z0-9_.-]{1,64}$", v)),
                             "a query parameter name, e.g. \"since\""),
    "data.stream": (lambda v: bool(re.match(r"^[A-Za-z0-9_-]{1,256}$", v)),
                    "a JetStream stream name"),
    "data.username": (lambda v: 0 < len(v) <= 256, "a user name"),
    "data.tls_ca": (lambda v: bool(v.strip()), "a path to a PEM file"),
    "data.tls_cert": (lambda v: bool(v.strip()), "a path to a PEM file"),
    "data.tls_key": (lambda v: bool(v.strip()), "a path to a PEM file"),
    "data.snapshot_rows": (_between(1, 10_000_000), "an integer 1..10000000"),
    "data.snapshot_seconds": (_between(0.1, 86_400), "seconds, 0.1..86400"),
    "data.max_rows": (_between(1, 100_000_000), "an integer 1..100000000"),
    "data.max_bytes": (_between(1, 1 << 40), "a number of bytes"),
    "data.max_columns": (_between(1, 100_000), "an integer 1..100000"),
    "data.timeout_s": (_between(0.1, 86_400), "seconds, 0.1..86400"),
    "data.max_pages": (_between(1, 1_000_000), "an integer 1..1000000"),
    "data.task": (_one_of(*TASKS), " or ".join(repr(t) for t in TASKS)),
    "data.label": (lambda v: bool(v.strip()), "the CSV's label column name"),
    "data.pii": (lambda v: len(set(v)) == len(v) and all(x.strip() for x in v),
                 "distinct CSV column names"),
    "data.pii_action": (_one_of("hmac", "drop"), "'hmac' or 'drop'"),
    "data.test_fraction": (_between(0.0, 0.9, lo_open=True, hi_open=True),
                           "a fraction in (0, 0.9), e.g. 0.2"),
    "data.region": (lambda v: _regions_ok([v]) and v != regions.ANY_REGION,
                    "a region name such as 'eu-west-1' (letters, digits, '.', '_', '-')"),
    "data.parent": (lambda v: bool(_SNAPSHOT_ID.match(v)), "a snapshot id 'sha256:<64 hex>'"),
    "store.path": (lambda v: bool(v.strip()), "a directory, relative to the workdir"),
    "store.allowed_regions": (_regions_ok, 'region names or "*" (any region)'),
    "model.kind": (_one_of(*MODEL_KINDS), "'mlp', 'cnn', 'sklearn', 'torch' or 'onnx'"),
    "model.estimator": (lambda v: bool(_ESTIMATOR.match(v)),
                        "a scikit-learn estimator class, e.g. "
                        "'sklearn.ensemble.HistGradientBoostingClassifier'"),
    "model.params": (lambda v: len(v) <= 64 and all(_PARAM.match(k) for k in v),
                     "a table of the estimator's keyword arguments, e.g. {max_iter = 100}"),
    "model.module": (lambda v: bool(_MODULE.match(v)),
                     "'PATH.py:function' (relative to the pipeline file) or "
                     "'package.module:function'"),
    "model.path": (lambda v: bool(v.strip()) and v.endswith(".onnx"),
                   "an .onnx file, relative to the pipeline file"),
    "model.input": (lambda v: 0 < len(v) <= 256, "the name of the ONNX graph's input"),
    "model.output": (lambda v: 0 < len(v) <= 256, "the name of the ONNX graph's output"),
    "model.hidden": (_widths(1, 65536), "a non-empty list of layer widths 1..65536, e.g. [128]"),
    "model.channels": (_widths(1, 1024, max_len=16),
                       "a non-empty list of channel counts 1..1024, e.g. [16, 32]"),
    "train.epochs": (_between(1, 10_000), "an integer 1..10000"),
    "train.batch_size": (_between(1, 65536), "an integer 1..65536"),
    "train.lr": (_between(0, 10, lo_open=True, hi_open=True), "a number in (0, 10), e.g. 0.001"),
    "train.seed": (_between(0, 2**32 - 1), "an integer 0..4294967295"),
    "train.device": (_one_of("auto", "cpu", "cuda"), "'auto', 'cpu' or 'cuda'"),
    "train.weight_decay": (_between(0, 1, hi_open=True), "a number in [0, 1)"),
    "train.threads": (_between(0, 256), "an integer 0..256 (0: PyTorch's default)"),
    "compress.prune": (_between(0, 1, hi_open=True), "a fraction in [0, 1)"),
    "compress.finetune_epochs": (_between(0, 1000), "an integer 0..1000"),
    "compress.quantize": (_one_of("none", "int8"), "'none' or 'int8'"),
    "compress.calibration_rows": (_between(1, _MAX_ROWS), f"an integer 1..{_MAX_ROWS}"),
    "export.formats": (lambda v: "onnx" in v and set(v) <= {"onnx", "tflite"}
                       and len(set(v)) == len(v),
                       '["onnx"] or ["onnx", "tflite"]'),
    "export.check_rows": (_between(1, _MAX_ROWS), f"an integer 1..{_MAX_ROWS}"),
    "profile.bins": (_between(2, 100), "an integer 2..100"),
    "profile.sample_rows": (_between(1, _MAX_ROWS), f"an integer 1..{_MAX_ROWS}"),
    "bundle.name": (lambda v: bool(_BUNDLE_NAME.match(v)),
                    "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"),
    "bundle.version": (_between(1, 2**31 - 1), "an integer > 0"),
    "bundle.publisher_key": (lambda v: bool(v.strip()),
                             "a path to the publisher's private key (PEM), relative to the "
                             "pipeline file"),
    "bundle.smoke_rows": (_between(1, 1000), "an integer 1..1000"),
}


def _check_section(where: str, section: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """Every key of ``table`` typed and in range; returns the values to build the section."""
    kinds = _field_kinds(_SECTIONS[section])
    unknown = sorted(set(table) - set(kinds))
    if unknown:
        raise PipelineConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(f'{section}.{k}' for k in unknown)} (known keys of [{section}]: "
            f"{', '.join(kinds)})"
        )
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{section}.{key}"
        typed = _check_type(where, name, value, kinds[key])
        check, good = _RULES[name]
        if name == "data.source" and "://" in typed:
            # A URL is shown redacted, with what exactly is wrong with it.
            try:
                urls.check_source(typed)
            except InvalidInputError as exc:
                raise PipelineConfigError(f"{where}: {exc}") from None
        if not check(typed):
            what = "out of range" if kinds[key] in ("int", "float") else "not allowed"
            raise PipelineConfigError(
                f"{where}: {name} = {_toml(value)} is {what}; expected {good}"
            )
        out[key] = typed
    return out


@dataclass(frozen=True)
class Pipeline:
    path: Path
    data: DataSettings
    store: StoreSettings
    model: ModelSettings
    train: TrainSettings
    compress: CompressSettings
    export: ExportSettings
    profile: ProfileSettings
    bundle: BundleSettings

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @classmethod
    def load(cls, path: Path) -> Pipeline:
        """Read and check a pipeline file: every section and key known, every value of the
        documented type and range; PipelineConfigError names the first one that is not."""
        path = Path(path).resolve()
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise PipelineConfigError(
                f"pipeline file {path} {what}; pass a PIPELINE.toml (see examples/pipelines/)"
            )
        try:
            doc = tomlfile.load(path)
        except InvalidInputError as exc:
            raise PipelineConfigError(f"{exc} (check the file's TOML syntax)") from None
        except OSError as exc:
            raise PipelineConfigError(f"pipeline file {path}: {exc.strerror}") from None
        where = path.name
        unknown = sorted(set(doc) - set(_SECTIONS))
        if unknown:
            raise PipelineConfigError(
                f"{where}: unknown section{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(f'[{u}]' for u in unknown)} (known: "
                f"{', '.join(f'[{s}]' for s in _SECTIONS)})"
            )
        for name, table in doc.items():
            if not isinstance(table, dict):
                raise PipelineConfigError(
                    f"{where}: {name} = {_toml(table)} is {_kind(table)}; expected a [{name}] "
                    "section (a table)"
                )
        if "source" not in doc.get("data", {}):
            raise PipelineConfigError(
                f"{where}: data.source is required (e.g. [data] source = \"sklearn:digits\")"
            )
        parts = {name: kind(**_check_section(where, name, doc.get(name, {})))
                 for name, kind in _SECTIONS.items()}
        pipeline = cls(path=path, **parts)
        pipeline.validate()
        return pipeline

    def validate(self) -> None:
        """Check every value again (after ``dataclasses.replace``) and across sections."""
        where = self.path.name
        for name in _SECTIONS:
            values = {k: v for k, v in self.section(name).items() if v is not None}
            _check_section(where, name, values)
        kind = urls.source_kind(self.data.source)
        if kind != "sklearn" and not self.data.label:
            raise PipelineConfigError(
                f"{where}: data.label is required for a {kind} source (the label column's name)"
            )
        if kind == "sql" and (self.data.query is None) == (self.data.table is None):
            raise PipelineConfigError(
                f"{where}: a SQL source needs exactly one of data.query (a SELECT) or data.table")
        if kind == "sql" and self.data.query and self.data.query.strip().rstrip(";").count(";"):
            raise PipelineConfigError(f"{where}: data.query holds more than one statement")
        if self.data.next and self.data.page_param:
            raise PipelineConfigError(
                f"{where}: data.next and data.page_param both set; an API pages one way")
        for key, kinds in _KEY_SOURCES.items():
            value = getattr(self.data, key)
            if value not in (None, [], {}) and kind not in kinds and value != getattr(
                    _DATA_DEFAULTS, key):
                raise PipelineConfigError(
                    f"{where}: data.{key} applies to {' and '.join(kinds)} sources only (this "
                    f"pipeline reads a {kind} source); remove it")
        if kind in ("sklearn", "csv") and _uses_table_keys(self.data):
            raise PipelineConfigError(
                f"{where}: data.features, categorical, timestamp, impute and window apply to "
                "parquet, SQL, HTTP and stream sources; a CSV source is read strictly as a "
                "numeric table (load it with a parquet: or SQL source to use them)")
        if self.data.source.startswith("sklearn:") and self.data.pii:
            raise PipelineConfigError(
                f"{where}: data.pii = {_toml(self.data.pii)}, but {self.data.source} has no PII "
                "columns; remove data.pii"
            )
        if self.data.source.startswith("sklearn:"):
            task = ("regression" if self.data.source.partition(":")[2] in REGRESSION_SOURCES
                    else "classification")
            if task != self.data.task:
                raise PipelineConfigError(
                    f"{where}: data.task = {_toml(self.data.task)}, but {self.data.source} is a "
                    f"{task} data set; set data.task = {_toml(task)}"
                )
        self._validate_model(where)

    def _validate_model(self, where: str) -> None:
        m = self.model
        defaults = ModelSettings()
        for key, kind in _KIND_KEYS.items():
            if getattr(m, key) != getattr(defaults, key) and m.kind != kind:
                raise PipelineConfigError(
                    f"{where}: model.{key} applies to model.kind = {_toml(kind)} only (this "
                    f"pipeline has kind = {_toml(m.kind)}); remove it"
                )
        required = {"sklearn": "estimator", "torch": "module", "onnx": "path"}.get(m.kind)
        if required and getattr(m, required) is None:
            example = {"estimator": '"sklearn.ensemble.HistGradientBoostingClassifier"',
                       "module": '"models/net.py:build"', "path": '"model.onnx"'}[required]
            raise PipelineConfigError(
                f"{where}: model.{required} is required for model.kind = {_toml(m.kind)} "
                f"(e.g. {required} = {example})"
            )
        if m.kind in ("sklearn", "onnx"):
            if "tflite" in self.export.formats:
                raise PipelineConfigError(
                    f"{where}: export.formats lists \"tflite\", which is not available for "
                    f"model.kind = {_toml(m.kind)} (TFLite export converts PyTorch models); "
                    'use formats = ["onnx"]'
                )
            if self.compress.prune > 0:
                raise PipelineConfigError(
                    f"{where}: compress.prune = {self.compress.prune:g} does not apply to "
                    f"model.kind = {_toml(m.kind)} (pruning removes units of PyTorch layers); "
                    "remove it or set prune = 0"
                )

    def section(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))


# [data] keys that only some kinds of source read
_KEY_SOURCES: dict[str, tuple[str, ...]] = {
    "query": ("sql",), "table": ("sql",), "password_env": ("sql", "http", "stream"),
    "watermark": ("sql", "http"), "records": ("http",), "next": ("http",),
    "page_param": ("http",), "page_start": ("http",), "headers": ("http",),
    "watermark_param": ("http",), "stream": ("stream",), "username": ("stream",),
    "tls_ca": ("stream",), "tls_cert": ("stream",), "tls_key": ("stream",),
    "snapshot_rows": ("stream",), "snapshot_seconds": ("stream",), "max_pages": ("http",),
}
_DATA_DEFAULTS = DataSettings(source="sklearn:digits")


def _uses_table_keys(d: DataSettings) -> bool:
    return bool(d.features or d.categorical or d.timestamp or d.impute or d.window)


def settings_digest(*parts: Any) -> str:
    """A stable hash of JSON-serializable settings and upstream digests."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
