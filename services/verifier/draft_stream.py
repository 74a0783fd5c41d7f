"""The raw I/O of one Drafter.Draft call on the verifier's side: a reader that drains
the stream into an inbox (so branches that arrive while the target is busy are there
when the session looks), and the end of a finished session's stream."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

END_S = 2.0  # a finished session's worker ends its stream within this, or it is cancelled

_ending: set[asyncio.Task] = set()  # finished sessions' streams their workers are ending


async def read_into(call, inbox: asyncio.Queue) -> None:
    """Every message of ``call`` into ``inbox``, then EOF, or the error that ended it."""
    try:
        while True:
            msg = await call.read()
            inbox.put_nowait(msg)
            if msg is grpc.aio.EOF:
                return
    except asyncio.CancelledError:
        raise
    except Exception as error:  # the stream failed: the next look at the inbox raises it
        inbox.put_nowait(error)


def message_of(item):
    """An inbox item as a message; the end of the stream raises."""
    if isinstance(item, Exception):
        raise item
    if item is grpc.aio.EOF:
        raise ConnectionError("the draft worker closed the session")
    return item


def end_finished(call, reader: asyncio.Future | None) -> None:
    """Half-close a finished session's stream in the background, instead of cancelling
    it: a cancel can reach the worker before the outcome that said the session
    finished, and the worker then keeps the session's draft chunks for a reopen that
    never comes (drafter/service.py REOPEN_GRACE_S)."""
    ending = asyncio.ensure_future(_end(call, reader))
    _ending.add(ending)
    ending.add_done_callback(_ending.discard)


async def _end(call, reader) -> None:
    """The worker, told or seeing the commands end, ends the call; one that does not
    within END_S is cancelled."""
    try:
        with contextlib.suppress(Exception):  # gone, or too slow: nothing waits on this stream
            await asyncio.wait_for(call.done_writing(), END_S)
            await asyncio.wait_for(call.code(), END_S)
    finally:
        call.cancel()  # (a no-op on a call that has ended)
        if reader is not None:
            reader.cancel()
