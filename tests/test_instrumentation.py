"""ThreadIdSpanProcessor with the real OpenTelemetry SDK, end to end through the gRPC receiver."""

from __future__ import annotations

import os
import threading

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from isoscope.instrumentation import ThreadIdSpanProcessor
from isoscope.model import Stats, TraceBatch, iter_spans
from isoscope.receivers.otlp import OtlpGrpcReceiver


def _provider(exporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(ThreadIdSpanProcessor())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def test_spans_carry_the_kernel_tid_of_their_thread():
    memory = InMemorySpanExporter()
    tracer = _provider(memory).get_tracer("t")
    tids: dict[str, int] = {}

    def work(name: str) -> None:
        tids[name] = threading.get_native_id()
        with tracer.start_as_current_span(name):
            pass

    threads = [threading.Thread(target=work, args=(f"w{i}",), name=f"worker-{i}") for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    work("main")
    spans = {s.name: s for s in memory.get_finished_spans()}
    assert set(spans) == {"w0", "w1", "w2", "main"}
    assert len(set(tids.values())) == 4  # distinct kernel threads
    for name, span in spans.items():
        assert span.attributes["thread.id"] == tids[name]
    # It is a real kernel tid of this process, not a Python-level counter.
    assert os.path.isdir(f"/proc/{os.getpid()}/task/{tids['main']}")
    assert spans["w1"].attributes["thread.name"] == "worker-1"
    assert spans["main"].attributes["thread.name"] == threading.current_thread().name


def test_application_set_thread_id_is_kept():
    memory = InMemorySpanExporter()
    tracer = _provider(memory).get_tracer("t")
    tracer.start_span("x", attributes={"thread.id": 42, "thread.name": "app"}).end()
    span = memory.get_finished_spans()[0]
    assert span.attributes["thread.id"] == 42 and span.attributes["thread.name"] == "app"


def test_thread_id_reaches_the_receiver():
    batches: list[TraceBatch] = []

    class Consumer:
        def consume(self, batch: TraceBatch) -> None:
            batches.append(batch)

    receiver = OtlpGrpcReceiver(Consumer(), Stats(), "127.0.0.1:0")
    addr = receiver.start()
    try:
        provider = _provider(OTLPSpanExporter(endpoint=addr, insecure=True, timeout=10))
        seen: list[int] = []

        def work() -> None:
            seen.append(threading.get_native_id())
            provider.get_tracer("t").start_span("threaded").end()
        t = threading.Thread(target=work)
        t.start()
        t.join()
        provider.shutdown()
    finally:
        receiver.shutdown(1.0)
    span = next(iter_spans(batches[0].request))
    attrs = {kv.key: kv.value for kv in span.attributes}
    assert attrs["thread.id"].int_value == seen[0]
    assert attrs["thread.name"].string_value.startswith("Thread-")
