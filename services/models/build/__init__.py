"""Builds the bundled model pair from the CPython stdlib (``outrider build-models``)."""
