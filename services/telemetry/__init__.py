"""Observability: metrics for the Ray dashboard (``metrics.py``) and OpenTelemetry
tracing (``tracing.py``). Nothing here is imported by ``services/core``, which stays
free of Ray and OpenTelemetry."""
