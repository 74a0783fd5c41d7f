"""Reliability tools that run against a served cluster: the API fuzzer."""
