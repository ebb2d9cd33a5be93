"""The validated edge: one YAML (or dict) config for a run, checked by a strict
pydantic schema and turned into olrec's frozen dataclasses.

Sections (every one optional; every key optional)::

    data:      path, format (ml100k | generic | synthetic), columns {old: new},
               max_events, synthetic {SyntheticConfig fields}
    features:  categorical, multi, numeric, counters, crosses, recency [{key, alpha}],
               prior_strength -- keys left out take the format's defaults:
               MovieLens defaults for ml100k, FeatureSpec.infer for generic
               data, FeatureSpec defaults for synthetic data
    learner:   every LearnerConfig field, defaults from LearnerConfig
    report:    dir, name, window, frozen_at
    train:     every TrainConfig field (workers, shards, checkpoints, ...), and
               run_dir: where the run's event log, checkpoints and ledger live

An unknown key or a bad value is a :class:`ConfigError` naming the dotted path
and the value, e.g. ``learner.batch_size: must be >= 1, got 0``. Relative
paths are taken relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError
from typing_extensions import Annotated

from .embedding import Optimizer
from .features import FeatureSpec, ml100k_spec
from .learner import LearnerConfig, OnlineLearner
from .storage import is_uri, mask_uri
from .model import Arch
from .sources import SyntheticConfig
from .train import TrainConfig

__all__ = [
    "ConfigError", "Config", "DataConfig", "ReportConfig", "ConfigSchema",
    "load_config", "build_learner",
]

Format = Literal["ml100k", "generic", "synthetic"]

class ConfigError(ValueError):
    """A config that does not validate. ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str] | str, source: str | None = None) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        if len(self.errors) == 1:
            return prefix + self.errors[0]
        head = f"{prefix}{len(self.errors)} problems in the config"
        return "\n".join([head, *(f"  - {e}" for e in self.errors)])


# ---------------------------------------------------------------------------
# The schema. Defaults come from the dataclasses, so they follow their changes.

def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__} has no field {name!r}")


SInt = Annotated[int, Strict()]  # no "5" -> 5, no true -> 1, no 2.0 -> 2
SBool = Annotated[bool, Strict()]
PosInt = Annotated[int, Strict(), Field(ge=1)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Name = Annotated[str, Strict(), Field(min_length=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSchema(_Section):
    n_users: PosInt = _default(SyntheticConfig, "n_users")
    n_items: PosInt = _default(SyntheticConfig, "n_items")
    n_events: PosInt = _default(SyntheticConfig, "n_events")
    dim: PosInt = _default(SyntheticConfig, "dim")
    zipf_a: PosFloat = _default(SyntheticConfig, "zipf_a")
    new_item_fraction: Annotated[float, Field(ge=0, lt=1)] = _default(SyntheticConfig, "new_item_fraction")
    drift: Annotated[float, Field(ge=0, allow_inf_nan=False)] = _default(SyntheticConfig, "drift")
    base_logit: Annotated[float, Field(allow_inf_nan=False)] = _default(SyntheticConfig, "base_logit")
    seed: SInt = _default(SyntheticConfig, "seed")
    chunk: PosInt = _default(SyntheticConfig, "chunk")


class DataSchema(_Section):
    path: Name | None = None
    format: Format = "ml100k"
    columns: dict[Name, Name] = Field(default_factory=dict)
    max_events: PosInt | None = None
    synthetic: SyntheticSchema = Field(default_factory=SyntheticSchema)


class RecencySchema(_Section):
    key: Name
    alpha: Annotated[float, Field(gt=0, lt=1)]


class FeaturesSchema(_Section):
    categorical: tuple[Name, ...] | None = None
    multi: tuple[Name, ...] | None = None
    numeric: tuple[Name, ...] | None = None
    counters: tuple[Name, ...] | None = None
    crosses: tuple[Name, ...] | None = None
    recency: tuple[RecencySchema, ...] | None = None
    prior_strength: PosFloat | None = None

    def overrides(self) -> dict[str, Any]:
        """The keys that were set, in FeatureSpec's argument form."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            v = getattr(self, name)
            if v is None:
                continue
            out[name] = tuple((r.key, r.alpha) for r in v) if name == "recency" else v
        return out


class LearnerSchema(_Section):
    batch_size: PosInt = _default(LearnerConfig, "batch_size")
    warmup_batch_size: PosInt | None = None  # None: LearnerConfig's default, capped at batch_size
    warmup_events: NonNegInt = _default(LearnerConfig, "warmup_events")
    dim: PosInt = _default(LearnerConfig, "dim")
    arch: Arch = _default(LearnerConfig, "arch")
    hidden: tuple[PosInt, ...] = _default(LearnerConfig, "hidden")
    sparse_optimizer: Optimizer = _default(LearnerConfig, "sparse_optimizer")
    sparse_lr: PosFloat = _default(LearnerConfig, "sparse_lr")
    init_std: Annotated[float, Field(ge=0, allow_inf_nan=False)] = _default(LearnerConfig, "init_std")
    dense_lr: PosFloat = _default(LearnerConfig, "dense_lr")
    admit_after: PosInt = _default(LearnerConfig, "admit_after")
    ttl_events: PosInt | None = _default(LearnerConfig, "ttl_events")
    expire_every: PosInt = _default(LearnerConfig, "expire_every")
    seed: SInt = _default(LearnerConfig, "seed")
    threads: PosInt = _default(LearnerConfig, "threads")
    wide: SBool = _default(LearnerConfig, "wide")
    wide_weight: Annotated[float, Field(ge=0, le=1)] = _default(LearnerConfig, "wide_weight")
    wide_alpha: PosFloat = _default(LearnerConfig, "wide_alpha")
    wide_l2: Annotated[float, Field(ge=0, allow_inf_nan=False)] = _default(LearnerConfig, "wide_l2")


class ReportSchema(_Section):
    dir: Name | None = None  # None: reports/<name>
    name: Name | None = None  # None: named after the data (its format, or the file's stem)
    window: PosInt | None = None  # None: about 20 windows over the run
    frozen_at: Annotated[float, Field(gt=0, lt=1)] | None = 0.5  # None: no frozen baseline


NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


def check_local_dir(path: str | Path) -> str:
    """``path`` as given, or a ValueError if it is a URI: ``olrec demo`` runs everything on
    this machine, its Triton from the run directory, so its run is on a local disk."""
    text = str(path)
    if is_uri(text):
        raise ValueError(f"--run-dir {mask_uri(text)!r}: olrec demo keeps its run on this machine's disk; "
                         "`olrec train` and `olrec serve` take an object-store URI (see cluster/README.md, "
                         "Shared storage)")
    return text


class TrainSchema(_Section):
    run_dir: Name = "runs/train"  # a local path or an object-store URI (olrec.storage)

    workers: PosInt = _default(TrainConfig, "workers")
    shards: PosInt = _default(TrainConfig, "shards")
    use_gpu: SBool = _default(TrainConfig, "use_gpu")
    cpus_per_worker: PosFloat = _default(TrainConfig, "cpus_per_worker")
    cpus_per_shard: NonNegFloat = _default(TrainConfig, "cpus_per_shard")
    sync_every: PosInt = _default(TrainConfig, "sync_every")
    max_staleness: NonNegInt = _default(TrainConfig, "max_staleness")
    continuous: SBool = _default(TrainConfig, "continuous")
    poll_interval: PosFloat = _default(TrainConfig, "poll_interval")
    block_rows: PosInt = _default(TrainConfig, "block_rows")
    checkpoint_every_s: PosFloat = _default(TrainConfig, "checkpoint_every_s")
    checkpoint_every_events: PosInt | None = _default(TrainConfig, "checkpoint_every_events")
    keep_checkpoints: PosInt = _default(TrainConfig, "keep_checkpoints")
    max_failures: Annotated[int, Strict(), Field(ge=-1)] = _default(TrainConfig, "max_failures")
    report_every_s: PosFloat = _default(TrainConfig, "report_every_s")
    idle_wait_s: PosFloat = _default(TrainConfig, "idle_wait_s")


class ConfigSchema(_Section):
    data: DataSchema = Field(default_factory=DataSchema)
    features: FeaturesSchema = Field(default_factory=FeaturesSchema)
    learner: LearnerSchema = Field(default_factory=LearnerSchema)
    report: ReportSchema = Field(default_factory=ReportSchema)
    train: TrainSchema = Field(default_factory=TrainSchema)


# ---------------------------------------------------------------------------
# The frozen result.

@dataclass(frozen=True)
class DataConfig:
    format: Format
    path: Path | None
    columns: Mapping[str, str]
    max_events: int | None
    synthetic: SyntheticConfig


@dataclass(frozen=True)
class ReportConfig:
    dir: Path | None
    name: str | None
    window: int | None
    frozen_at: float | None

    def name_for(self, data: DataConfig) -> str:
        if self.name:
            return self.name
        if data.format == "generic" and data.path is not None:
            return data.path.name.split(".")[0] or "generic"
        return data.format

    def dir_for(self, data: DataConfig) -> Path:
        """The configured directory, or ``reports/<name>``."""
        return self.dir if self.dir is not None else Path("reports") / self.name_for(data)

    def window_for(self, n_events: int) -> int:
        """The configured window, or about 20 windows over ``n_events``."""
        return self.window or max(1, -(-n_events // 20))


@dataclass(frozen=True)
class Config:
    data: DataConfig
    #: The feature spec, resolved now for ml100k and synthetic data; ``None``
    #: for generic data, whose spec is inferred from the events (see
    #: :meth:`feature_spec`) with ``feature_overrides`` on top.
    features: FeatureSpec | None
    feature_overrides: Mapping[str, Any]
    learner: LearnerConfig
    report: ReportConfig
    train: TrainConfig
    run_dir: Path | str  # a local path, or an object-store URI
    schema: ConfigSchema  # the validated input, as given

    def feature_spec(self, events: pa.Table | None = None) -> FeatureSpec:
        """The spec to learn ``events`` with; for generic data, inferred from them."""
        if self.features is not None:
            spec = self.features
        else:
            if events is None:
                raise ValueError("generic data: the feature spec is inferred from the events; pass them")
            sample = events.slice(0, min(events.num_rows, 10_000))
            spec = _build("features", lambda: FeatureSpec.infer(events.schema, sample, **self.feature_overrides))
        if events is not None:
            _check_columns(spec, events)
        return spec

    def to_dict(self, spec: FeatureSpec | None = None) -> dict[str, Any]:
        """A plain dict (YAML/JSON-ready) that :func:`load_config` reads back to an
        equal config. With ``spec``, ``features`` is that resolved spec."""
        d = self.schema.model_dump(mode="json", exclude_none=True)
        d["learner"] = _plain(dataclasses.asdict(self.learner))
        spec = spec or self.features
        if spec is not None:
            d["features"] = {
                "categorical": list(spec.categorical), "multi": list(spec.multi), "numeric": list(spec.numeric),
                "counters": list(spec.counters), "crosses": list(spec.crosses), "recency": [{"key": k, "alpha": a} for k, a in spec.recency],
                "prior_strength": spec.prior_strength,
            }
        return d


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------------------
# Loading.

def load_config(source: str | Path | Mapping[str, Any] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Validate a YAML file (path) or a dict into a :class:`Config`; ``None`` is all defaults.

    ``overrides`` (nested like the config, e.g. ``{"learner": {"batch_size": 64}}``)
    is merged over the source before validation: command-line flags win over
    the file and are checked the same way. Raises :class:`ConfigError` naming
    every bad field and value.
    """
    label = None
    if source is None:
        raw: Any = {}
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise ConfigError(f"not valid YAML{at}: {getattr(e, 'problem', None) or e}", label) from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"not UTF-8 text: {e}", label) from None
        raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}", label)
    if overrides:
        raw = _merge(raw, overrides)
    try:
        schema = ConfigSchema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e), label) from None
    try:
        return _from_schema(schema)
    except ConfigError as e:
        raise ConfigError(e.errors, label) from None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _from_schema(s: ConfigSchema) -> Config:
    d = s.data
    synthetic = _build("data.synthetic", lambda: SyntheticConfig(**d.synthetic.model_dump()))
    data = DataConfig(format=d.format, path=Path(d.path) if d.path else None,
                      columns=MappingProxyType(dict(d.columns)), max_events=d.max_events, synthetic=synthetic)

    overrides = s.features.overrides()
    if d.format == "ml100k":
        features: FeatureSpec | None = _build("features", lambda: dataclasses.replace(ml100k_spec(), **overrides))
    elif d.format == "synthetic":
        features = _build("features", lambda: FeatureSpec(**overrides))
    else:
        features = None

    args = s.learner.model_dump()
    if args["warmup_batch_size"] is None:  # unset: the default warm-up, never above batch_size
        args["warmup_batch_size"] = min(_default(LearnerConfig, "warmup_batch_size"), args["batch_size"])
    learner = _build("learner", lambda: LearnerConfig(**args))

    r = s.report
    report = ReportConfig(dir=Path(r.dir) if r.dir else None, name=r.name, window=r.window, frozen_at=r.frozen_at)
    t = s.train.model_dump()
    run_dir = t.pop("run_dir")
    run_dir = run_dir if is_uri(run_dir) else Path(run_dir)
    train = _build("train", lambda: TrainConfig(**t))
    return Config(data, features, MappingProxyType(overrides), learner, report, train, run_dir, s)


def build_learner(spec: FeatureSpec, cfg: LearnerConfig) -> OnlineLearner:
    """An :class:`OnlineLearner`; a spec or config it rejects is a :class:`ConfigError`."""
    return _build("features", lambda: OnlineLearner(spec, cfg))


# ---------------------------------------------------------------------------
# Messages.

_FIELD_MSG = re.compile(r"^(?:(?:FeatureSpec|LearnerConfig|SyntheticConfig|TrainConfig)\.)?([a-z_][a-z0-9_]*):? (.+)$", re.S)
_OWNER = re.compile(r"^(?:FeatureSpec|LearnerConfig|SyntheticConfig|TrainConfig):? ")


def _build(section: str, make):
    """Run a dataclass constructor; its ValueError becomes a ConfigError under ``section``."""
    try:
        return make()
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        m = _FIELD_MSG.match(msg)
        if m and m.group(1) in _SECTION_FIELDS.get(section, ()):
            raise ConfigError(f"{section}.{m.group(1)}: {m.group(2)}") from None
        raise ConfigError(f"{section}: {_OWNER.sub('', msg)}") from None


_SECTION_FIELDS = {
    "features": set(FeaturesSchema.model_fields),
    "learner": {f.name for f in dataclasses.fields(LearnerConfig)},
    "data.synthetic": {f.name for f in dataclasses.fields(SyntheticConfig)},
}


def _check_columns(spec: FeatureSpec, events: pa.Table) -> None:
    problems = []
    for role in ("categorical", "multi", "numeric"):
        missing = [c for c in getattr(spec, role) if c not in events.column_names]
        if missing:
            problems.append(f"features.{role}: column(s) {missing} not in the events (they have {events.column_names})")
    if problems:
        raise ConfigError(problems)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (key)"
        else:
            out += ("." if out else "") + str(part)
    return out


def _format_errors(e: ValidationError) -> list[str]:
    lines = []
    for err in e.errors(include_url=False):
        loc = list(err["loc"])
        kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
        path = _loc(tuple(loc))
        if kind == "extra_forbidden":
            model = _model_at(loc[:-1])
            hint = ""
            if model is not None:
                close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(model.model_fields)})"
            lines.append(f"{path}: unknown key{hint}")
            continue
        if kind == "missing":
            lines.append(f"{path}: required")
            continue
        lines.append(f"{path}: {_message(kind, ctx, err['msg'])}, got {value!r}")
    return lines


def _model_at(loc: list) -> type[BaseModel] | None:
    """The schema class at a location, following nested sections (and list items)."""
    model: Any = ConfigSchema
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = _inner_model(field.annotation)
        if model is None:
            return None
    return model


def _inner_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in getattr(tp, "__args__", ()) or ():
        m = _inner_model(arg)
        if m is not None:
            return m
    return None


def _message(kind: str, ctx: dict, msg: str) -> str:
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind in bounds:
        op, key = bounds[kind]
        return f"must be {op} {ctx.get(key)}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be an integer"
    if kind in ("float_type", "float_parsing"):
        return "must be a number"
    if kind == "finite_number":
        return "must be a finite number"
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false"
    if kind in ("string_type",):
        return "must be a string"
    if kind == "string_too_short":
        return "must not be empty"
    if kind in ("tuple_type", "list_type"):
        return "must be a list"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping"
    return msg[0].lower() + msg[1:] if msg else kind
