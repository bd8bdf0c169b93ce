"""Network transport of the FL-GLM client-server channel (arXiv 2406.14898): gRPC over TLS.

Modules (import them directly; this package imports nothing at import time):

* `fedsplit.transport.handshake`   - hellos on the wire, `SessionFactory` (server), `connect` (client).
* `fedsplit.transport.grpc_server` - `GrpcServer`: one bidi stream per client session.
* `fedsplit.transport.grpc_client` - `GrpcTransport`, `connect_grpc`: the client's end of that stream.
* `fedsplit.transport.chunking`    - frames larger than one gRPC message, cut and reassembled.
* `fedsplit.transport.errors`      - `TransportError`, `HandshakeRefusedError`.

Server::

    factory = SessionFactory(verifier, handler_for=lambda cid: functools.partial(trunk.handle, cid), run_id=run)
    server = GrpcServer("0.0.0.0:7443", factory, tls=load_server_tls(key, cert), on_disconnect=drop).start()

Client::

    channel = connect_grpc("server:7443", ClientCredentials(...), tls=load_channel_tls(ca_crt))
"""

from __future__ import annotations
