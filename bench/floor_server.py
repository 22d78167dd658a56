"""The floor for a Python policy server: an asyncio unix-socket server that reads each policy
request up to its empty line and answers ``action=DUNNO`` without deciding anything.

Run as ``python -m bench.floor_server PATH``; it serves until SIGTERM. The benchmark measures
tlsgate-policyd against it, so it does the same framing work and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

ANSWER = b"action=DUNNO\n\n"
MAX_REQUEST = 65536


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            # readuntil is bounded by the stream limit, so a request without an end is refused.
            await reader.readuntil(b"\n\n")
            writer.write(ANSWER)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def main_async(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(_serve, path, limit=MAX_REQUEST)
    os.chmod(path, 0o666)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("floor server ready", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    asyncio.run(main_async(sys.argv[1]))


if __name__ == "__main__":
    main()
