"""Layer metrics: the Prometheus exporter, kernel-side aggregates, the OTLP metrics push and the admin HTTP server."""
