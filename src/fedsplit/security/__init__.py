"""Key encryption for FL-GLM (Peng et al., arXiv 2406.14898): identities, handshake, sealing, TLS.

Every hidden state and gradient between a client and the server is sealed with AES-256-GCM keys
that only that client and the server derive, from an Ed25519-authenticated X25519 handshake; a
peer client, or anyone else on the path, sees ciphertext, sizes and timing only. See
docs/security.md for the threat model and the protocol.

Modules (import them directly; this package imports nothing at import time):

* `fedsplit.security.identity`  - Ed25519 identity keys, 0600 key files, fingerprints
                                  (``fedsplit keygen`` is `fedsplit.recipes.keygen`).
* `fedsplit.security.pki`       - private CA, server and mutual-TLS client certificates.
* `fedsplit.security.handshake` - ClientHello / ServerHello, HandshakeVerifier, session keys.
* `fedsplit.security.replay`    - ReplayGuard: the handshake's freshness window and nonce memory.
* `fedsplit.security.aead`      - SecureSession: seal / open frames with replay protection.
* `fedsplit.security.tls`       - PEM bytes for grpc.ssl_server/channel_credentials.
* `fedsplit.security.errors`    - SecurityError and its specific subclasses.
* `fedsplit.security.wire`      - protocol constants and the canonical encoding.
* `fedsplit.security.signing`   - Ed25519-signed control messages (server-hierarchical mode).
"""

from __future__ import annotations
