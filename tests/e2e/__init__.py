"""End-to-end tests: the real ``isoscope run`` daemon between real OpenTelemetry clients and a real backend."""
