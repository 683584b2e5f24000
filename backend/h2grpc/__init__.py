"""A gRPC server (HTTP/2, every kind of RPC) on the event loop itself.

Why not grpc.aio: its C core runs HTTP/2 in its own threads and hands every
completed operation back to the event loop through a completion-queue poller,
so each streamed message costs two thread hops and ~100-280 µs of CPU in the
serving process (bench/floor.py measures it) — more than vLLM's whole front end
spends per token. Here a streamed token is one `transport.write` of a DATA
frame from the handler's own task: no threads, no hops, ~10-20 µs. Why the
framing is ours and not hyper-h2's `H2Connection`: its send path measured
18-46 µs per message here against 1-4.5 µs hand-built (issue 11), so the
protocol is hand-written and tested against what it must reject
(tests/reliability/test_inbound.py) and against hyper-h2 as a strict client
(tests/unit/test_h2_conformance.py).

Scope, deliberately small (what a gRPC client needs from this worker):
  * h2c (cleartext HTTP/2 with prior knowledge, as grpc clients dial
    `insecure`), TCP or `unix:` sockets; no TLS (the worker listens on
    loopback unless told otherwise).
  * unary and server-streaming methods (one request message per call), and
    client-streaming and bidirectional ones (server reflection), whose
    handlers iterate their requests as they come; requests compressed with
    gzip/deflate are accepted, replies are sent uncompressed (allowed by the
    gRPC spec whatever the client accepts).
  * HTTP/2 flow control both ways, SETTINGS, PING (ACKs paced, see
    liveness.PING_ACK_INTERVAL), RST_STREAM -> the handler task is cancelled
    (and with it the engine request), GOAWAY on shutdown and on idle
    connections, CONTINUATION, padding, grpc-timeout deadlines, keepalive
    pings to find a vanished peer, caps on connections, concurrent streams and
    message size.
HPACK decoding uses the `hpack` package (the python-hyper one); replies only
send literal headers, so our encoder needs no dynamic table.

Handlers keep grpc.aio's signature `(request, context)`: `context.write`,
`context.abort(grpc.StatusCode, details)`, `context.invocation_metadata()`,
`context.cancelled()`, `context.peer()`, `context.time_remaining()`.

The modules, in layers: each imports only those before it
(tests/unit/test_h2_layers.py checks it); what a lower one must call upward is
handed to it as a callback or a small Protocol.
  frames      wire format: constants, frames, the header blocks we send, gRPC statuses
  stream      one stream's state; only its own methods change it
  flood       flood accounting: control frames, earned WINDOW_UPDATE credit
  inflow      request bytes in: the windows we grant, what we hold
  outflow     frames out: one write per loop turn, the peer's windows
  pace        how long one loop turn may spend handling frames, all connections
  headers     header blocks in: CONTINUATION, HPACK decoding and its limits
  liveness    a connection's timers: handshake, keepalive, PING ACKs, idle
  streams     a connection's stream table: opening (limits), calls running, ending
  connection  one HTTP/2 connection: frames in at a bounded pace, GOAWAY, eviction
  messages    a request message checked, decompressed and decoded
  calls       a gRPC call: method table, context, the handler run to its status
  server      settings, listeners, the connection cap, graceful stop; wires the rest
"""

from backend.h2grpc.calls import AbortError, Context, Method, methods_of
from backend.h2grpc.server import Server

__all__ = ["AbortError", "Context", "Method", "Server", "methods_of"]
