"""Workers with one piece of the per-token path cut out: ablations that price a
piece where it runs (`python -m bench --worker-cut NAME`, target `B:NAME`).

Started as `python -m bench.cuts --cut NAME --addr ...`: the patch below, then
`backend.__main__.main` unchanged. Only the streamed messages of PredictStream
change; the final Reply (usage, the last piece) is sent as always, so the
client still counts every token and the per-token CPU stays comparable:

* `nowrite`: every streamed Reply is built, serialized and framed as
  `h2grpc.calls.Context.write` + `Sender.send_now` do for a stream alone on
  its connection (gRPC prefix, DATA frame, written at once), and the bytes are
  dropped instead of written to the socket. B - B:nowrite = the socket write, the
  kernel's loopback path and waking the client.
* `discard`: every streamed Reply is built and handed to a send that drops it.
  B:nowrite - B:discard = the transport's Python work.
* `nosend`: streamed pieces are neither built into Replies nor sent
  (`generation.run` with no `send`). B:discard - B:nosend = building Replies.
  B:nosend - A = the worker's own path without any output: per-request
  preparation, `OutputState.feed`, the generate loop.
"""

from __future__ import annotations

import sys
from typing import Any

CUTS = ("nowrite", "discard", "nosend")


def apply(cut: str) -> None:
    from backend.h2grpc.frames import DATA, GRPC_PREFIX, frame
    from backend.servicer import BackendServicer

    original = BackendServicer._generate

    async def drop(reply: Any) -> None:
        return None

    async def unwritten(reply: Any) -> None:
        data = reply.SerializeToString()
        frame(DATA, 0, 1, GRPC_PREFIX.pack(0, len(data)) + data)  # built, never written

    sends = {"nowrite": unwritten, "discard": drop, "nosend": None}

    async def generate(self: BackendServicer, req: Any, send: Any) -> Any:
        if send is not None:
            send = sends[cut]
        return await original(self, req, send)

    if cut not in CUTS:
        raise SystemExit(f"unknown cut {cut!r}; choose from {', '.join(CUTS)}")
    BackendServicer._generate = generate  # type: ignore[method-assign]


def main() -> None:
    argv = sys.argv[1:]
    i = argv.index("--cut")
    cut = argv[i + 1]
    del argv[i : i + 2]
    apply(cut)
    from backend.__main__ import main as worker_main

    worker_main(argv)


if __name__ == "__main__":  # vLLM's spawned processes re-import __main__
    main()
