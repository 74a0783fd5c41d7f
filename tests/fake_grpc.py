"""A client that answers every request with one fixed outcome, for checking how the
fuzzer and the soak classify what a server returns."""

import grpc


class Failing(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class FakeStream:
    """The chunks, then ``error`` if given; ``cancel()`` ends it as gRPC does."""

    def __init__(self, chunks, error=None):
        self.chunks, self.error, self.cancelled = list(chunks), error, False

    def __iter__(self):
        for chunk in self.chunks:
            if self.cancelled:
                raise Failing(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
            yield chunk
        if self.cancelled:
            raise Failing(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
        if self.error is not None:
            raise self.error

    def cancel(self):
        self.cancelled = True


class FakeClient:
    def __init__(self, error=None, chunks=()):
        self.error, self.chunks = error, list(chunks)

    def generate(self, request, timeout=None):
        if self.error is not None and not self.chunks:
            raise self.error
        return FakeStream(self.chunks, self.error)
