"""OTLP metrics push: the ``isoscope_*`` metrics for users without Prometheus.

:class:`OtlpMetricsExporter` mirrors what :class:`~isoscope.metrics.prometheus.PrometheusExporter`
records (after its cardinality cap) into an OpenTelemetry SDK ``MeterProvider``
that exports periodically over OTLP/gRPC or OTLP/HTTP.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

from isoscope.metrics.prometheus import (
    KVM_EXIT_SECONDS,
    KVM_EXITS,
    LABEL_OVERFLOW,
    LAYER_STALL,
    PREFIX,
    SPAN_LAYER,
    SPAN_OVERHEAD,
    STATS_COUNTERS,
    STATS_GAUGES,
    STEAL,
    MetricSpec,
    PrometheusExporter,
)
from isoscope.model import Stats

logger = logging.getLogger(__name__)

__all__ = ["OtlpMetricsExporter", "otlp_metric_name"]


def otlp_metric_name(prom_name: str) -> str:
    """``isoscope_layer_stall_seconds`` → ``isoscope.layer_stall_seconds`` (``_total`` dropped)."""
    name = prom_name.removesuffix("_total")
    return "isoscope." + name.removeprefix(PREFIX)


def _unit(prom_name: str) -> str:
    if prom_name.removesuffix("_total").endswith("_seconds"):
        return "s"
    return "1"


class OtlpMetricsExporter:
    """Pushes the same metrics over OTLP through the OpenTelemetry SDK's ``MeterProvider``.

    Histograms and incremented counters are mirrored as they are recorded (the
    exporter calls this object as a :class:`MetricSink`, after its cardinality cap);
    mirrored counters (steal, label overflow) and the :class:`Stats` self-telemetry
    are observable instruments read at each export. The kernel log2 histograms
    (run-queue and syscall latency) are Prometheus-only: the OpenTelemetry API has
    no instrument for a histogram whose cumulative state is owned elsewhere.
    Exemplars are not sent over OTLP.

    Metric names use dots (``isoscope.span_layer_seconds``); see :func:`otlp_metric_name`.
    Attribute names are the Prometheus label names (``workload_namespace``, ``workload_pod``,
    ``workload_container``, ``workload_service``, ``layer`` …), so a backend that converts
    OTLP to Prometheus series ends up with the same labels a scrape gives, and the
    dashboards and alert rules work on either path.
    Needs the ``opentelemetry-exporter-otlp`` package.

    Args:
        exporter: the Prometheus exporter whose recordings are mirrored.
        stats: the shared self-telemetry counters.
        endpoint: ``grpc://host:port`` (OTLP/gRPC, plaintext), ``http(s)://host:port``
            (OTLP/HTTP, ``/v1/metrics`` appended unless a path is given).
        interval_s: export interval.
        resource_attributes: extra resource attributes (``host.name``, ``k8s.node.name`` …).
    """

    def __init__(self, exporter: PrometheusExporter, stats: Stats, endpoint: str, *,
                 interval_s: float = 15.0, resource_attributes: Mapping[str, str] | None = None) -> None:
        from opentelemetry.metrics import CallbackOptions, Observation
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
        from opentelemetry.sdk.resources import Resource

        self._stats = stats
        self._exporter = exporter
        reader = PeriodicExportingMetricReader(_otlp_metric_exporter(endpoint),
                                               export_interval_millis=interval_s * 1000)
        views = [
            View(instrument_name=otlp_metric_name(SPAN_LAYER.name),
                 aggregation=ExplicitBucketHistogramAggregation(boundaries=exporter.span_buckets)),
            View(instrument_name=otlp_metric_name(SPAN_OVERHEAD.name),
                 aggregation=ExplicitBucketHistogramAggregation(boundaries=exporter.ratio_buckets)),
        ]
        build = exporter.build_labels
        resource = Resource.create({"service.name": "isoscope", "service.version": build.get("version", ""),
                                    "os.version": build.get("kernel", ""), **dict(resource_attributes or {})})
        self._provider = MeterProvider(resource=resource, metric_readers=[reader], views=views)
        meter = self._provider.get_meter("isoscope", build.get("version"))
        self._histograms = {spec.name: meter.create_histogram(otlp_metric_name(spec.name), _unit(spec.name),
                                                              spec.help)
                            for spec in (SPAN_LAYER, SPAN_OVERHEAD)}
        self._counters = {spec.name: meter.create_counter(otlp_metric_name(spec.name), _unit(spec.name), spec.help)
                          for spec in (LAYER_STALL, KVM_EXITS, KVM_EXIT_SECONDS)}

        def mirrored(spec: MetricSpec) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def callback(_: CallbackOptions) -> Iterable[Observation]:
                return [Observation(float(v), dict(zip(spec.labels, k)))
                        for k, v in exporter.counter_values(spec.name).items()]
            return callback

        for spec in (STEAL, LABEL_OVERFLOW):
            meter.create_observable_counter(otlp_metric_name(spec.name), [mirrored(spec)], _unit(spec.name), spec.help)

        def from_stats(name: str, labelnames: tuple[str, ...], gauge: bool) -> Callable[[CallbackOptions],
                                                                                       Iterable[Observation]]:
            def callback(_: CallbackOptions) -> Iterable[Observation]:
                counters, gauges = stats.snapshot()
                series = (gauges if gauge else counters).get(name, {})
                return [Observation(float(v), dict(zip(labelnames, k))) for k, v in series.items()
                        if len(k) == len(labelnames)]
            return callback

        for name, (doc, labelnames) in STATS_COUNTERS.items():
            meter.create_observable_counter(otlp_metric_name(name), [from_stats(name, labelnames, False)], "1", doc)
        for name, (doc, labelnames) in STATS_GAUGES.items():
            meter.create_observable_gauge(otlp_metric_name(name), [from_stats(name, labelnames, True)], "1", doc)
        exporter.add_sink(self)

    def histogram(self, name: str, value: float, attributes: Mapping[str, str]) -> None:
        """Mirror one histogram observation (called by the exporter)."""
        instrument = self._histograms.get(name)
        if instrument is not None:
            instrument.record(value, dict(attributes))

    def counter(self, name: str, value: float, attributes: Mapping[str, str]) -> None:
        """Mirror one counter increment (called by the exporter)."""
        instrument = self._counters.get(name)
        if instrument is not None:
            instrument.add(value, dict(attributes))

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export now; True when the export finished in time."""
        return bool(self._provider.force_flush(timeout_millis=int(timeout_s * 1000)))

    def shutdown(self) -> None:
        """Export what is left and stop the periodic export."""
        self._provider.shutdown()


def _otlp_metric_exporter(endpoint: str) -> Any:
    """An OTLP metric exporter for ``grpc://host:port`` or ``http(s)://host:port[/path]``."""
    if endpoint.startswith("grpc://"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
        return GrpcExporter(endpoint=endpoint.removeprefix("grpc://"), insecure=True)
    if endpoint.startswith(("http://", "https://")):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter
        rest = endpoint.partition("://")[2]
        url = endpoint if "/" in rest else endpoint.rstrip("/") + "/v1/metrics"
        return HttpExporter(endpoint=url)
    raise ValueError(f"OTLP metrics endpoint must start with grpc://, http:// or https://: {endpoint!r}")
