"""The eavesdropper and the peer client of FL-GLM's threat model (arXiv 2406.14898, Sec. 3).

Neither holds the session keys of a client-server pair; what they can capture is sealed frames.
:func:`capture_step` runs one real training step of :class:`~fedsplit.client.SplitClient` against
a :class:`~fedsplit.server.TrunkServer` through the project's channel with AES-256-GCM sessions
(:class:`~fedsplit.security.SecureSession`, random keys as the handshake would derive) and keeps
every frame exactly as the transport carries it, plus what the server decrypted (the control: the
same attacker if the hidden states were readable). :func:`frame_as_hidden` is the best an
attacker without keys can do with a frame: read its sealed body as fp32 hidden states of the
known shape, at every byte alignment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsplit.channel import Channel, InProcessTransport, ServerSession, parse_frame
from fedsplit.client import SplitClient
from fedsplit.protocol import decode_tensor, pb
from fedsplit.security.aead import SecureSession
from fedsplit.security.wire import Role
from fedsplit.server import TrunkServer
from fedsplit.split.parts import SplitParts
from fedsplit.train.config import TrainConfig


class _Tap:
    """A transport wrapper on the path: records every request and reply frame as bytes."""

    def __init__(self, inner: InProcessTransport) -> None:
        self.inner = inner
        self.frames: list[bytes] = []

    def exchange(self, frame: bytes) -> bytes:
        self.frames.append(frame)
        reply = self.inner.exchange(frame)
        self.frames.append(reply)
        return reply

    def close(self) -> None:
        self.inner.close()


@dataclass
class CapturedStep:
    frames: list[bytes]  # every frame of the step, both directions, as on the wire
    server_view: torch.Tensor  # (B, T, H) the hidden states the server decrypted from FORWARD
    tokens: torch.Tensor  # (N,) the client's real tokens (ground truth, never on the wire)
    keep: torch.Tensor = field(repr=False)  # (B, T) bool: real positions


def capture_step(
    parts: SplitParts,
    batch: dict[str, torch.Tensor],
    cfg: TrainConfig,
    client_id: str = "client-0",
    run_id: str = "attack-capture",
) -> CapturedStep:
    """One sealed split step (FORWARD, BACKWARD, OPTIMIZER_STEP) of ``batch``, captured on the path."""
    c2s, s2c = os.urandom(32), os.urandom(32)
    server = TrunkServer(parts.trunk, cfg, total_steps=1)
    seen: list[torch.Tensor] = []

    def handler(kind: int, rnd: int, step: int, message):
        if kind == pb.FORWARD:
            seen.append(decode_tensor(message.hidden, "Forward.hidden"))
        return server.handle(client_id, kind, rnd, step, message)

    server_sealer: Any = SecureSession(s2c, c2s, run_id, client_id, Role.SERVER)  # a Sealer (wider buffer type)
    client_sealer: Any = SecureSession(c2s, s2c, run_id, client_id, Role.CLIENT)
    session = ServerSession(client_id, handler, server_sealer)
    tap = _Tap(InProcessTransport(session))
    channel = Channel(tap, client_sealer)
    client = SplitClient(parts.head, parts.tail, channel, cfg, total_steps=1)
    client.train_step([batch] * cfg.grad_accum)  # one optimizer step, whatever the accumulation
    keep = batch["attention_mask"].bool()
    return CapturedStep(tap.frames, seen[0], batch["input_ids"][keep], keep)


def frame_as_hidden(frame: bytes, shape: tuple[int, int, int], offset: int = 0) -> torch.Tensor:
    """The sealed body of ``frame`` read as fp32 ``(B, T, H)`` from byte ``offset`` (zero-filled if short).

    The frame header (kind, round, step, seq) is public; the body is AES-GCM ciphertext.
    """
    body = parse_frame(frame).body[offset:]
    count = int(np.prod(shape))
    values = np.frombuffer(body[: (len(body) // 4) * 4], dtype="<f4")[:count]
    out = np.zeros(count, dtype=np.float32)
    out[: values.size] = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    return torch.from_numpy(out).reshape(shape)
