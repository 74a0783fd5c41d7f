"""Options of the internal gRPC channels and servers (verifier <-> draft worker).

Message limits are explicit and derived from the largest block there can be (gamma
at most MAX_GAMMA drafts, each with at most MAX_SUPPORT support tokens of q), not
gRPC's 4 MiB default, which a dense q at a real vocabulary used to exceed. A block
over the limit is refused where it is built, with the reason (RESOURCE_EXHAUSTED);
the verifier fails the request rather than mistake it for a lost worker.

Keepalive pings find a dead peer or a partition in seconds instead of TCP's minutes;
a frozen peer (SIGSTOP) still answers pings from its kernel, which is why the verifier
also puts a deadline on every read (verifier/service.py ``DraftLink``).
"""

from __future__ import annotations

from ..core.draft_q import MAX_SUPPORT
from ..core.gamma import MAX_GAMMA

# A block: tokens, round, guess, timing and q' (per support token a varint id delta of
# at most 3 bytes below V = 2^21, and a level byte; a tail weight per draft), with
# room for protobuf framing.
MAX_BLOCK_BYTES = MAX_GAMMA * (MAX_SUPPORT * 4 + 32) + 4096
# A DraftCommand carries the prompt and committed tokens (up to a model's context).
MAX_MESSAGE_BYTES = max(MAX_BLOCK_BYTES, 16 << 20)

_COMMON = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
CHANNEL_OPTIONS = _COMMON
# The server must allow the client's pings, or it answers them with GOAWAY.
SERVER_OPTIONS = _COMMON + [("grpc.http2.min_ping_interval_without_data_ms", 5_000)]
