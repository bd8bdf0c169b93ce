"""``fedsplit audit-inverter``: the learned attacker a client's in-run privacy audit uses (issue 12, item 4).

The audit's attack (b) is the SIP / BiSR forward attack (arXiv 2409.00960): a ridge map from the
cut's hidden states onto the embedding space, fitted on PUBLIC text (tinyshakespeare, tinystories,
alpaca from ../shared) through the run's base head of depth ``model.head_layers``. Reads top to
bottom: base model -> public windows -> hidden states at cut 1 -> ridge fit -> one safetensors
file, which ``[privacy] audit_inverter`` names. The operator fits it once; clients only load it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fedsplit.config import RunConfig

log = logging.getLogger(__name__)


def fit_audit_inverter(cfg: RunConfig, out: Path, *, positions: int = 100_000, seq_len: int = 64,
                       shared: Path | None = None) -> dict[str, float]:
    """Fit and save the ridge inverter for the run's head depth; returns its held-out token recovery."""
    from fedsplit.attacks.corpus import collect, public_sequences, sequence_batches
    from fedsplit.attacks.hidden import embedding_matrix
    from fedsplit.attacks.inversion import RidgeInverter, token_recovery
    from fedsplit.data import shared_data_dir
    from fedsplit.models import load_model

    if positions < 100:
        raise ValueError(f"positions: expected >= 100 public tokens, got {positions}")
    shared = shared if shared is not None else shared_data_dir()
    if shared is None:
        raise FileNotFoundError("audit-inverter: the public text (../shared/data or $FEDSPLIT_SHARED) is absent")
    model, tokenizer = load_model(cfg.model.name)
    model.requires_grad_(False)
    model.eval()
    p = cfg.model.head_layers
    sequences = public_sequences(tokenizer, shared, positions, seq_len, cfg.train.seed)
    cut = max(1, len(sequences) * 9 // 10)  # the last tenth scores the fit
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fit = collect(model, [p], sequence_batches(sequences[:cut], 16, pad), desc="public hidden states")
    inverter = RidgeInverter.fit(fit.hidden[p], fit.tokens, embedding_matrix(model))
    recovery = float("nan")
    if sequences[cut:]:
        held = collect(model, [p], sequence_batches(sequences[cut:], 16, pad), desc="held-out hidden states")
        with torch.no_grad():
            recovery = token_recovery(inverter.predict(held.hidden[p]), held.tokens)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    inverter.save(out)
    log.info("audit inverter for p = %d: %d public positions, %.1f %% of held-out public tokens recovered; saved to %s",
             p, int(fit.tokens.numel()), 100 * recovery, out)
    return {"head_layers": float(p), "positions": float(fit.tokens.numel()), "public_recovery": recovery}
