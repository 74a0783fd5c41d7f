"""The algorithm core: sampling, rejection, proposers, KV handling and the engine loop.

Pure torch + transformers. Nothing here imports Ray, gRPC or OpenTelemetry, so the
same engine runs in-process, in tests and inside the Serve deployments that wrap it.
"""
