"""olrec's metrics on the Ray dashboard and Prometheus, through ``ray.util.metrics``.

A metric set is declared as a table of :class:`MetricSpec` rows (key, name,
kind, description, histogram boundaries); :class:`MetricSet` turns the table
into Ray metrics inside the process that records. :class:`TrainMetrics` is the
training loop's set; :class:`ServeMetrics` a serving replica's.

Recording is a no-op, never an error, where Ray is not initialised in the
process (a plain ``olrec train`` without a cluster, a unit test): nothing is
imported or created then. Ray's metrics are created on the first record made
with Ray initialised, so create the set where it records (inside the Ray
worker or actor), or pass it there: it pickles without its Ray objects.

What Prometheus sees (measured with Ray 2.60.0, OpenTelemetry export on, the
default ``RAY_enable_open_telemetry=1``):

- Ray adds the prefix ``ray_`` and a counter gets the suffix ``_total``:
  ``olrec_train_events`` is scraped as ``ray_olrec_train_events_total``, the
  gauge ``olrec_train_watermark`` as ``ray_olrec_train_watermark``, the
  histogram ``olrec_train_pull_latency_seconds`` as
  ``ray_olrec_train_pull_latency_seconds_bucket`` (label ``le``), ``_count``
  and ``_sum``. :attr:`MetricSpec.exported` gives the exported name.
- The ``_sum`` of a histogram is approximate: Ray rebuilds observations from
  bucket midpoints (one observation of 0.005 s between the bounds 0.001 and
  0.01 shows a ``_sum`` of 0.0055). The bucket counts and ``_count`` are exact.
- Each series carries the tags given to the set plus Ray's labels
  ``Component`` (``core_worker``), ``NodeAddress``, ``SessionName``,
  ``Version``, ``WorkerId`` and ``otel_scope_name``/``_version``/``_schema_url``.
  Series are per worker process: sum over ``WorkerId`` for a job's total.
  A tag key may not be one of Ray's label names.
- The endpoint is each node's metrics agent,
  ``http://<node-ip>:<metrics-export-port>/metrics`` (``ray start
  --metrics-export-port``; without it Ray picks a free port and lists it in
  ``<temp-dir>/prom_metrics_service_discovery.json``). No token is needed.
- Workers export every ``RAY_metrics_report_interval_ms`` (default 10000; the
  OpenTelemetry reader uses at least 1000). Set it in the environment of
  ``ray start`` (the raylet passes it on to workers and job drivers) to see
  values within about two seconds instead of ten or more.
- A series disappears some time after its worker process exits: scrape while
  the recording process lives.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "COUNTER",
    "GAUGE",
    "HISTOGRAM",
    "LATENCY_BOUNDARIES_S",
    "MetricSpec",
    "MetricSet",
    "TrainMetrics",
    "ServeMetrics",
    "FreshnessMetrics",
    "FRESHNESS_BOUNDARIES_S",
    "ray_active",
]

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"
_KINDS = (COUNTER, GAUGE, HISTOGRAM)

#: Seconds: from half a millisecond (a local shard pull) to five seconds (a stalled actor).
LATENCY_BOUNDARIES_S: tuple[float, ...] = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)

_NAME_RE = re.compile(r"^olrec_[a-z0-9_]*[a-z0-9]$")
_TAG_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Labels Ray 2.60 puts on every series of a custom metric (plus "le" on histogram buckets).
_RAY_LABELS = frozenset({
    "Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId",
    "otel_scope_name", "otel_scope_version", "otel_scope_schema_url", "le",
})


@dataclass(frozen=True)
class MetricSpec:
    """One metric: ``key`` is the report key it is recorded from, ``name`` what Ray declares."""

    key: str
    name: str
    kind: str
    description: str
    boundaries: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError(f"MetricSpec {self.name!r}: key must not be empty")
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"MetricSpec name {self.name!r}: must start with 'olrec_' and use only lowercase letters, "
                "digits and '_'")
        if self.kind not in _KINDS:
            raise ValueError(f"MetricSpec {self.name!r}: kind {self.kind!r} is not one of {_KINDS}")
        if self.kind == HISTOGRAM:
            b = tuple(float(x) for x in self.boundaries)
            if not b or b[0] <= 0 or any(y <= x for x, y in zip(b, b[1:])):
                raise ValueError(
                    f"MetricSpec {self.name!r}: histogram boundaries must be positive and increasing, "
                    f"got {self.boundaries!r}")
            object.__setattr__(self, "boundaries", b)
        elif self.boundaries:
            raise ValueError(f"MetricSpec {self.name!r}: only a histogram takes boundaries")
        if self.kind == COUNTER and self.name.endswith("_total"):
            raise ValueError(f"MetricSpec {self.name!r}: Ray appends '_total' to a counter itself")

    @property
    def exported(self) -> str:
        """The name Prometheus scrapes (a histogram's series add ``_bucket``, ``_count``, ``_sum``)."""
        return f"ray_{self.name}_total" if self.kind == COUNTER else f"ray_{self.name}"


def ray_active() -> bool:
    """Whether Ray is initialised in this process (a driver after ``ray.init``, or a worker).

    Never imports Ray: a process that has not imported it cannot have initialised it.
    """
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def counter_delta(last: int | float, total: int | float) -> tuple[float, float]:
    """``(increment, new_last)`` for a counter fed cumulative totals.

    A total below the last one (the learner was restored from an older
    checkpoint) re-bases without incrementing: a Prometheus counter never goes down.
    """
    if total > last:
        return total - last, total
    return 0.0, total


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class MetricSet:
    """A table of metrics sharing one set of tags, recorded through ``ray.util.metrics``.

    Subclasses set ``SPECS``. Counters are fed cumulative totals (the set adds
    the difference since the last total), gauges the current value, histograms
    single observations. Values that are missing, ``None`` or not finite are
    skipped (a gauge keeps its last value).
    """

    SPECS: ClassVar[tuple[MetricSpec, ...]] = ()

    def __init__(self, tags: Mapping[str, str] | None = None, *,
                 start_totals: Mapping[str, int | float] | None = None) -> None:
        tags = dict(tags or {})
        for k, v in tags.items():
            if not isinstance(k, str) or not _TAG_RE.match(k) or k.startswith("__"):
                raise ValueError(f"tag key {k!r}: must match {_TAG_RE.pattern} and not start with '__'")
            if k in _RAY_LABELS:
                raise ValueError(f"tag key {k!r}: Ray sets this label itself; choose another name")
            if not isinstance(v, str):
                raise TypeError(f"tag {k!r}: value must be str, got {type(v).__name__} {v!r}")
        specs: dict[str, MetricSpec] = {}
        names: set[str] = set()
        for s in self.SPECS:
            if s.key in specs:
                raise ValueError(f"{type(self).__name__}: duplicate metric key {s.key!r}")
            if s.name in names:
                raise ValueError(f"{type(self).__name__}: duplicate metric name {s.name!r}")
            specs[s.key] = s
            names.add(s.name)
        self._tags = tags
        self._specs = specs
        self._totals: dict[str, float] = {}
        for k, v in (start_totals or {}).items():
            self._spec(k, COUNTER)
            self._totals[k] = float(v)
        self._metrics: dict[str, Any] | None = None

    # -- introspection -------------------------------------------------------------------------------
    @property
    def tags(self) -> dict[str, str]:
        return dict(self._tags)

    @property
    def specs(self) -> tuple[MetricSpec, ...]:
        return tuple(self._specs.values())

    @property
    def active(self) -> bool:
        """Whether records reach Ray (Ray is initialised in this process)."""
        return ray_active()

    # -- recording -----------------------------------------------------------------------------------
    def record(self, report: Mapping[str, Any]) -> None:
        """Record every key of ``report`` that names a metric; other keys are ignored.

        Counter keys carry cumulative totals, gauge keys current values,
        histogram keys one observation or an iterable of observations.
        """
        backend = self._backend()
        for key, value in report.items():
            spec = self._specs.get(key)
            if spec is None:
                continue
            if spec.kind == COUNTER:
                self._add_total(spec, value, backend)
            elif spec.kind == GAUGE:
                self._set(spec, value, backend)
            else:
                values = value if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else (value,)
                for v in values:
                    self._observe(spec, v, backend)

    def set(self, key: str, value: float) -> None:
        """Set the gauge ``key``."""
        self._set(self._spec(key, GAUGE), value, self._backend())

    def add_total(self, key: str, total: float) -> None:
        """Feed the counter ``key`` a cumulative total."""
        self._add_total(self._spec(key, COUNTER), total, self._backend())

    def inc(self, key: str, delta: float) -> None:
        """Add ``delta`` (> 0; anything else is skipped) to the counter ``key``."""
        self._spec(key, COUNTER)  # checks the key and its kind
        d = _finite(delta)
        if d is not None and d > 0:
            self._totals[key] = self._totals.get(key, 0.0) + d
            backend = self._backend()
            if backend is not None:
                backend[key].inc(d)

    def observe(self, key: str, value: float) -> None:
        """One observation of the histogram ``key``."""
        self._observe(self._spec(key, HISTOGRAM), value, self._backend())

    # -- internals -----------------------------------------------------------------------------------
    def _spec(self, key: str, kind: str) -> MetricSpec:
        spec = self._specs.get(key)
        if spec is None:
            raise KeyError(f"{type(self).__name__} has no metric {key!r}; it has {sorted(self._specs)}")
        if spec.kind != kind:
            raise TypeError(f"{type(self).__name__} metric {key!r} is a {spec.kind}, not a {kind}")
        return spec

    def _add_total(self, spec: MetricSpec, total: Any, backend: dict[str, Any] | None) -> None:
        t = _finite(total)
        if t is None:
            return
        delta, self._totals[spec.key] = counter_delta(self._totals.get(spec.key, 0.0), t)
        if delta > 0 and backend is not None:
            backend[spec.key].inc(delta)

    def _set(self, spec: MetricSpec, value: Any, backend: dict[str, Any] | None) -> None:
        v = _finite(value)
        if v is not None and backend is not None:
            backend[spec.key].set(v)

    def _observe(self, spec: MetricSpec, value: Any, backend: dict[str, Any] | None) -> None:
        v = _finite(value)
        if v is not None and backend is not None:
            backend[spec.key].observe(v)

    def _backend(self) -> dict[str, Any] | None:
        """The Ray metric objects, created on first use; ``None`` where Ray is not initialised."""
        if self._metrics is not None:
            return self._metrics
        if not ray_active():
            return None
        from ray.util import metrics as rm

        keys = tuple(self._tags)
        made: dict[str, Any] = {}
        for s in self._specs.values():
            if s.kind == COUNTER:
                m = rm.Counter(s.name, description=s.description, tag_keys=keys)
            elif s.kind == GAUGE:
                m = rm.Gauge(s.name, description=s.description, tag_keys=keys)
            else:
                m = rm.Histogram(s.name, description=s.description, boundaries=list(s.boundaries), tag_keys=keys)
            made[s.key] = m.set_default_tags(dict(self._tags))
            if s.kind == COUNTER:
                # A counter exists at 0 from the start (a dashboard's error rate reads 0, not "no
                # data"); Ray's Counter.inc refuses 0, its record underneath does not.
                made[s.key]._record(0.0)
        self._metrics = made
        return made

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_metrics"] = None  # Ray metric objects are made again where the set is unpickled
        return state


class TrainMetrics(MetricSet):
    """The training loop's metrics; ``record`` takes the loop's report dict (``olrec.train``).

    ``events_trained`` is the learner's cumulative count; pass the count a
    restored learner starts from as ``events_start`` so the counter counts only
    this process's events. Pull and push latencies are observed one by one in seconds.
    """

    SPECS = (
        MetricSpec("events_trained", "olrec_train_events", COUNTER, "Events trained (learned from) by this worker."),
        MetricSpec("events_per_s", "olrec_train_events_per_second", GAUGE,
                   "Training throughput since the first batch, events per second."),
        MetricSpec("loss", "olrec_train_loss", GAUGE, "Mean training loss over the last report interval."),
        MetricSpec("auc", "olrec_train_auc", GAUGE, "Progressive AUC: predictions made before learning each event."),
        MetricSpec("watermark", "olrec_train_watermark", GAUGE,
                   "Log offset below which every event's update is in the weights."),
        MetricSpec("stream_lag", "olrec_train_stream_lag_events", GAUGE,
                   "Events in the log not yet in the weights (log end offset minus watermark)."),
        MetricSpec("shard_rows", "olrec_train_shard_rows", GAUGE, "Sparse rows held by the parameter-server shards."),
        MetricSpec("shard_bytes", "olrec_train_shard_bytes", GAUGE, "Bytes held by the parameter-server shards."),
        MetricSpec("checkpoint_age_s", "olrec_train_checkpoint_age_seconds", GAUGE,
                   "Seconds since the last committed checkpoint."),
        MetricSpec("pull_latency_s", "olrec_train_pull_latency_seconds", HISTOGRAM,
                   "Latency of one pull of sparse rows from the parameter server, seconds.", LATENCY_BOUNDARIES_S),
        MetricSpec("push_latency_s", "olrec_train_push_latency_seconds", HISTOGRAM,
                   "Latency of one push of sparse gradients to the parameter server, seconds.", LATENCY_BOUNDARIES_S),
    )

    def __init__(self, tags: Mapping[str, str] | None = None, *, events_start: int = 0) -> None:
        super().__init__(tags, start_totals={"events_trained": events_start})

    def observe_pull(self, seconds: float) -> None:
        self.observe("pull_latency_s", seconds)

    def observe_push(self, seconds: float) -> None:
        self.observe("push_latency_s", seconds)


class ServeMetrics(MetricSet):
    """A serving replica's metrics (``serve/app.py``): calls, errors and latency as
    answered, and the freshness of the weights it holds."""

    SPECS = (
        MetricSpec("requests", "olrec_serve_requests", COUNTER, "gRPC calls answered by this replica, any status."),
        MetricSpec("errors", "olrec_serve_errors", COUNTER, "gRPC calls answered with a status other than OK."),
        MetricSpec("cancelled", "olrec_serve_cancelled", COUNTER,
                   "Calls cancelled in the replica (the client's deadline passed or it gave up)."),
        MetricSpec("latency_s", "olrec_serve_latency_seconds", HISTOGRAM,
                   "Time a call spends in the replica, seconds.", LATENCY_BOUNDARIES_S),
        MetricSpec("watermark", "olrec_serve_watermark", GAUGE,
                   "Watermark of the rows served: every log event below it is in them."),
        MetricSpec("dense_events", "olrec_serve_dense_events", GAUGE,
                   "Events the replica's dense weights had learned (their version)."),
        MetricSpec("rows", "olrec_serve_rows", GAUGE, "Sparse rows the replica holds."),
    )


#: Freshness is seconds to minutes: buckets from 0.1 s to 2 min.
FRESHNESS_BOUNDARIES_S: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class FreshnessMetrics(MetricSet):
    """Freshness as the closed loop measures it (``olrec demo``): per sampled
    event, the time from its append to the log until the first answer whose
    watermark is past its offset."""

    SPECS = (
        MetricSpec("freshness_s", "olrec_freshness_seconds", HISTOGRAM,
                   "Seconds from an event's append to the log until an answer's watermark passed it.",
                   FRESHNESS_BOUNDARIES_S),
    )
