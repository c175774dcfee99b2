"""isoscope: which isolation layer stole a request's time.

The package reads as the data flow (see ``docs/architecture.md``)::

    kernel/  probes/  →  join/  ←  pipeline/  ←  receivers/otlp/
    host/    metadata/            pipeline/  →  exporters/   metrics/

``model`` is the vocabulary every stage passes; ``daemon`` only wires the
components together; ``cli`` is the command line.
"""

__version__ = "0.2.0"
