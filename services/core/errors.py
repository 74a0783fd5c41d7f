"""Errors that mean "the request is bad", as opposed to a fault of the server.

Front ends map this one type to their own protocol: exit code 2 in the CLI,
INVALID_ARGUMENT over gRPC. Nothing that raises it has changed any state.
"""


class InvalidRequest(ValueError):
    """A request that cannot be served as asked; the message says why."""


class UnsupportedModel(ValueError):
    """A model Outrider cannot serve exactly; raised at load, with the reason."""


class PoolExhausted(RuntimeError):
    """No room in a replica's KV pool for a session; nothing was changed. Front ends
    answer RESOURCE_EXHAUSTED with the message: the client may retry later."""
