"""Thread-precise span attributes for applications instrumented with OpenTelemetry.

isoscope joins a span with the kernel's stall timeline. Without a thread id it
can only match the whole process (``isolation.scope = process``); with the
OS thread id of the thread that ran the span it can match exactly the stalls
of that thread (``isolation.scope = thread``).

Python::

    provider = TracerProvider()
    provider.add_span_processor(ThreadIdSpanProcessor())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))

Java: the OpenTelemetry Java agent already adds ``thread.id`` and
``thread.name`` to every span (``AddThreadDetailsSpanProcessor``, switched by
``-Dotel.javaagent.add-thread-details``, on by default). That ``thread.id`` is
``Thread.getId()``, the JVM's own counter, **not** the kernel tid, so
isoscope cannot use it for a thread-precise join. No agent option records the
OS tid. Register a ``SpanProcessor`` of your own (an agent extension or an
``AutoConfigurationCustomizerProvider``) whose ``onStart`` sets
``thread.id`` to ``gettid()``, obtained through JNA
(``CLibrary.INSTANCE.syscall(186)`` on x86-64, ``178`` on arm64) or through
JNI. Virtual threads (Java 21+) move between carrier threads, so for them the
recorded tid is only the carrier at span start: prefer process scope there.

Go: call ``unix.Gettid()`` (``golang.org/x/sys/unix``) in a
``sdktrace.SpanProcessor``'s ``OnStart`` and set ``thread.id``. Goroutines
migrate between OS threads at any blocking point, so the value is exact only
for code that pins itself with ``runtime.LockOSThread()`` for the span's
duration; otherwise it names the thread the span *started* on.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

logger = logging.getLogger(__name__)

THREAD_ID = "thread.id"
THREAD_NAME = "thread.name"


class ThreadIdSpanProcessor(SpanProcessor):
    """Sets ``thread.id`` (kernel tid) and ``thread.name`` on every span as it starts.

    ``thread.id`` is ``threading.get_native_id()``: the tid the kernel (and
    so isoscope's probes) knows the thread by, in the process's own PID
    namespace. Attributes the application set itself are not overwritten.
    """

    def on_start(self, span: Span, parent_context: Optional[Context] = None) -> None:
        """Record the calling thread on the span."""
        attrs = span.attributes or {}
        if THREAD_ID not in attrs:
            span.set_attribute(THREAD_ID, threading.get_native_id())
        if THREAD_NAME not in attrs:
            span.set_attribute(THREAD_NAME, threading.current_thread().name)

    def on_end(self, span: ReadableSpan) -> None:
        """Nothing to do when a span ends."""

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered."""
        return True
