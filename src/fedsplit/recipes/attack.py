"""``fedsplit attack``: what the server, a peer client and an eavesdropper recover of a client's data.

Reads top to bottom: load the base model (the attacker has it) and the client's private batches,
run the head over public and private text at every head depth, then

    (a) nearest-neighbour inversion        per p and sigma
    (b) learned inversion (ridge, softmax)  per p and sigma, fitted on public text only
    (c) label leakage of the gradients     at both cuts, per sigma
    (d) a captured AES-GCM step            the eavesdropper's and the peer client's view
    defences                               short LoRA fine-tunes: held-out loss vs leakage

and write ``privacy_report.json``, ``privacy.png`` and ``metrics.jsonl`` (docs/privacy.md).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedsplit.adapters import add_part_adapters
from fedsplit.attacks.config import AttackSettings, parse_point
from fedsplit.attacks.corpus import CutPositions, collect, private_batches, public_sequences, sequence_batches
from fedsplit.attacks.defences import Defence, finetune
from fedsplit.attacks.gradients import (
    analytic_label_recovery,
    cut_gradients,
    matching_label_recovery,
    tail_logits,
    trunk_tail_logits,
)
from fedsplit.attacks.hidden import embedding_matrix
from fedsplit.attacks.inversion import (
    RidgeInverter,
    SoftmaxInverter,
    nearest_tokens,
    reconstruction_rouge_l,
    token_recovery,
)
from fedsplit.attacks.report import REPORT_VERSION, pareto_frontier, plot_privacy, recommend, write_report
from fedsplit.attacks.traffic import capture_step, frame_as_hidden
from fedsplit.channel import parse_frame
from fedsplit.config import RunConfig
from fedsplit.data import shared_data_dir
from fedsplit.data.errors import DataUnavailableError
from fedsplit.metrics import MetricsWriter
from fedsplit.models import load_model
from fedsplit.recipes.common import BatchStream, encode, eval_batches, load_federated_data, prepare_run_dir
from fedsplit.split import split_model


def _noisy(hidden: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    if not sigma:
        return hidden
    return hidden + sigma * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed))


def _learned(
    public: CutPositions,
    private: CutPositions,
    p: int,
    sigma: float,
    embedding,
    tokenizer,
    settings: AttackSettings,
    softmax: bool,
) -> dict[str, Any]:
    """Attack (b) at one point: the attacker fits on public text with the same noise, scores private."""
    pub, priv = _noisy(public.hidden[p], sigma, settings.seed), _noisy(private.hidden[p], sigma, settings.seed + 1)
    ridge = RidgeInverter.fit(pub, public.tokens, embedding, ridge=settings.ridge)
    guesses = {"ridge": ridge.predict(priv)}
    if softmax:
        guesses["softmax"] = (
            SoftmaxInverter(ridge)
            .fit(pub, public.tokens, steps=settings.softmax_steps, seed=settings.seed)
            .predict(priv)
        )
    scores = {name: token_recovery(g, private.tokens) for name, g in guesses.items()}
    best = max(scores, key=lambda name: scores[name])
    rouge = reconstruction_rouge_l(tokenizer, private.sequences(guesses[best]), private.sequences(private.tokens))
    return {
        "head_layers": p,
        "noise_std": sigma,
        "ridge": scores["ridge"],
        "ridge_metric": ridge.metric,
        "softmax": scores.get("softmax"),
        "best": best,
        "token_recovery": scores[best],
        "rouge_l": rouge,
        "_inverter": ridge,
    }


def _nearest(private: CutPositions, p: int, sigma: float, embedding, seed: int) -> dict[str, Any]:
    """Attack (a) at one point: the received vectors themselves, searched in the embedding matrix."""
    priv = _noisy(private.hidden[p], sigma, seed + 1)
    scores = {m: token_recovery(nearest_tokens(priv, embedding, m), private.tokens) for m in ("cosine", "l2")}
    return {"head_layers": p, "noise_std": sigma, **scores, "token_recovery": max(scores.values())}


def _gradients(model, p: int, q: int, batches, settings: AttackSettings) -> list[dict[str, Any]]:
    """Attack (c): labels (the response tokens) from dL/dh at both cuts, per sigma."""
    parts = split_model(model, p, q)
    rows = []
    for sigma in tqdm(settings.gradient_sigmas, desc="gradients (c)", unit="sigma"):
        totals = {"prior": 0.0, "analytic_cut2": 0.0, "analytic_cut1": 0.0, "matching_cut2": 0.0}
        count = 0
        for i, batch in enumerate(batches[: settings.gradient_batches]):
            mask, labels = batch["attention_mask"], batch["labels"]
            n = int((labels[:, 1:] != -100).sum())
            if not n:
                continue
            g = cut_gradients(parts, batch, sigma, torch.Generator().manual_seed(settings.seed + i))
            with torch.no_grad():  # what the server predicts with the tail alone, before looking at gradients
                prior = parts.tail(g.h_trunk, mask, mask.long().cumsum(-1).sub(1).clamp(min=0))[:, :-1].argmax(-1)
            supervised = labels[:, 1:] != -100
            scores = {
                "prior": float((prior[supervised] == labels[:, 1:][supervised]).float().mean()),
                "analytic_cut2": analytic_label_recovery(tail_logits(parts, mask), g.h_trunk, g.grad_trunk, labels),
                "analytic_cut1": analytic_label_recovery(trunk_tail_logits(parts, mask), g.h_head, g.grad_head, labels),
                "matching_cut2": matching_label_recovery(
                    tail_logits(parts, mask), g.h_trunk, g.grad_trunk, labels, steps=settings.matching_steps
                ),
            }
            for key, value in scores.items():
                totals[key] += value * n
            count += n
        rows.append(
            {
                "head_layers": p,
                "noise_std": sigma,
                "labels": count,
                **{k: v / max(count, 1) for k, v in totals.items()},
                "token_recovery": max(totals["analytic_cut2"], totals["analytic_cut1"], totals["matching_cut2"])
                / max(count, 1),
            }
        )
    return rows


def _traffic(cfg: RunConfig, batch, inverter: RidgeInverter, embedding, top_token: int) -> dict[str, Any]:
    """Attack (d): one real sealed step captured on the path; the same attacks on the bytes."""
    from fedsplit.security.aead import SecureSession
    from fedsplit.security.errors import AuthenticationError
    from fedsplit.security.wire import Role

    model, _ = load_model(cfg.model.name)
    parts = split_model(model, cfg.model.head_layers, cfg.model.tail_layers)
    add_part_adapters(parts, cfg.lora, seed=cfg.train.seed)
    step = capture_step(parts, batch, cfg.train)
    b, t, h = step.server_view.shape
    shape = (b, t, h)

    def attack(hidden: torch.Tensor) -> dict[str, float]:
        flat = hidden[step.keep].float()
        return {
            "nearest_neighbour": token_recovery(nearest_tokens(flat, embedding, "cosine"), step.tokens),
            "learned": token_recovery(inverter.predict(flat), step.tokens),
        }

    sealed = [attack(frame_as_hidden(frame, shape, offset)) for frame in step.frames for offset in range(4)]
    best = max(max(s.values()) for s in sealed)
    best_nn = max(s["nearest_neighbour"] for s in sealed)
    # The yardstick for "nothing": an inverter fed noise predicts the most frequent public token everywhere.
    guess = token_recovery(torch.full_like(step.tokens, top_token), step.tokens)
    peer = SecureSession(os.urandom(32), os.urandom(32), "attack-capture", "client-1", Role.SERVER)
    first = parse_frame(step.frames[0])
    try:  # a peer client holds its own session keys, not this client's: the frame does not open
        peer.open(first.kind, first.round, first.step, first.seq, first.body)
        peer_opens = True
    except AuthenticationError:
        peer_opens = False
    readable = attack(step.server_view)
    n = int(step.tokens.numel())
    return {
        "frames": len(step.frames),
        "bytes": sum(len(f) for f in step.frames),
        "positions": n,
        "chance": 1.0 / embedding.shape[0],
        "guess_most_frequent_token": guess,
        "eavesdropper": {
            "token_recovery": best,
            "tokens_recovered": round(best * n),
            "tried": len(sealed),
            "nearest_neighbour_tokens": round(best_nn * n),
            "above_guessing": best > guess,
        },
        "peer_client": {
            "opens_frames": peer_opens,
            "token_recovery": best,
            "tokens_recovered": round(best * n),
            "above_guessing": best > guess,
        },
        "readable_with_global_head": {**readable, "token_recovery": max(readable.values())},
    }


def auto_sigmas(learned: list[dict[str, Any]], p: int, max_recovery: float) -> tuple[float, float]:
    """From the sweep at depth p: the smallest sigma meeting ``max_recovery`` and the swept one below it."""
    swept = sorted((d["noise_std"], d["token_recovery"]) for d in learned if d["head_layers"] == p)
    meeting = [i for i, (_, recovery) in enumerate(swept) if recovery <= max_recovery]
    at = meeting[0] if meeting else len(swept) - 1
    return swept[at][0], swept[max(at - 1, 0)][0]


def _defence_points(settings: AttackSettings, p_run: int, learned: list[dict[str, Any]]) -> list[Defence]:
    """Baseline, the noise levels, the extra (p, sigma) points and the adversarial head ("auto": from the sweep)."""
    meets, below = auto_sigmas(learned, p_run, settings.max_recovery)
    sigmas = settings.quality_sigmas or (below, meets)
    adversarial_sigma = below if settings.adversarial_sigma < 0 else settings.adversarial_sigma
    points = [Defence(p_run, 0.0)] + [Defence(p_run, s) for s in dict.fromkeys(sigmas) if s]
    points += [Defence(p, s) for p, s in map(parse_point, settings.extra_points)]
    points += [Defence(p_run, adversarial_sigma, w) for w in settings.adversarial_weights if w]
    return points


def _defences(
    cfg: RunConfig,
    settings: AttackSettings,
    points: list[Defence],
    data,
    tokenizer,
    public_batches,
    private_b,
    metrics: MetricsWriter,
) -> list[dict[str, Any]]:
    """Fine-tune each defence on the pooled data, then attack the fine-tuned head with its own noise."""
    train = BatchStream(
        encode(data.pooled, tokenizer, cfg),
        cfg.train.batch_size,
        tokenizer.pad_token_id,
        cfg.train.padding_side,
        cfg.train.seed,
    ).take(settings.quality_steps)
    held_out = eval_batches(
        encode(data.eval, tokenizer, cfg), cfg.train.batch_size * 2, tokenizer.pad_token_id, cfg.train.padding_side
    )
    rows: list[dict[str, Any]] = []
    for defence in tqdm(points, desc="defences", unit="fine-tune"):
        model, _ = load_model(cfg.model.name)
        quality = finetune(
            model,
            defence,
            train,
            held_out,
            cfg.train,
            settings.quality_steps,
            tail_layers=cfg.model.tail_layers,
            lora=cfg.lora_head,
            seed=cfg.train.seed,
        )
        model.requires_grad_(False)
        embedding = embedding_matrix(model)
        public = collect(model, [defence.head_layers], public_batches, desc="public (tuned head)")
        private = collect(model, [defence.head_layers], private_b, desc="private (tuned head)")
        learned = _learned(
            public, private, defence.head_layers, defence.noise_std, embedding, tokenizer, settings, softmax=False
        )
        nearest = _nearest(private, defence.head_layers, defence.noise_std, embedding, settings.seed)
        row = {
            "name": defence.name,
            "head_layers": defence.head_layers,
            "noise_std": defence.noise_std,
            "adversarial_weight": defence.adversarial_weight,
            "heldout_loss": quality.heldout_loss,
            "zero_shot_loss": quality.zero_shot_loss,
            "final_train_loss": quality.train_losses[-1],
            "learned_recovery": learned["token_recovery"],
            "nearest_recovery": nearest["token_recovery"],
            "rouge_l": learned["rouge_l"],
            "token_recovery": max(learned["token_recovery"], nearest["token_recovery"]),
        }
        rows.append(row)
        metrics.write("defence", **row)
    base, zero_shot = rows[0]["heldout_loss"], rows[0]["zero_shot_loss"]
    for row in rows:
        row["quality_cost"] = (row["heldout_loss"] - base) / base  # relative held-out loss increase
        row["gain_lost"] = (row["heldout_loss"] - base) / (zero_shot - base) if zero_shot != base else None
    return rows


def run_attack(cfg: RunConfig, settings: AttackSettings, out: Path) -> dict[str, Any]:
    started = time.time()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    out = prepare_run_dir(out, cfg)
    shared = shared_data_dir()
    if shared is None:
        raise DataUnavailableError("fedsplit attack: the public text (../shared/data or $FEDSPLIT_SHARED) is absent")
    model, tokenizer = load_model(cfg.model.name)
    model.requires_grad_(False)
    model.eval()
    embedding = embedding_matrix(model)
    data = load_federated_data(cfg.data, cfg.train.seed)
    if not 0 <= settings.client < len(data.silos):
        raise ValueError(f"attack.client: expected 0..{len(data.silos) - 1}, got {settings.client}")
    p_run, q = cfg.model.head_layers, cfg.model.tail_layers
    depths = sorted(set(settings.head_depths) | {p_run})
    noise_depths = sorted(set(settings.noise_depths or (p_run,)) & set(depths) | {p_run})

    with MetricsWriter(out / "metrics.jsonl") as metrics:
        public_b = sequence_batches(
            public_sequences(tokenizer, shared, settings.public_positions, settings.seq_len, settings.seed),
            16,
            tokenizer.pad_token_id,
        )
        private_b = private_batches(
            data.silos[settings.client],
            tokenizer,
            cfg.train.max_length,
            cfg.train.batch_size,
            settings.private_positions,
        )
        public = collect(model, depths, public_b, desc="public hidden states")
        private = collect(model, depths, private_b, desc="private hidden states")
        metrics.write(
            "attack_data", public_positions=int(public.tokens.numel()), private_positions=int(private.tokens.numel())
        )

        top = torch.bincount(public.tokens).argmax()  # a learned attacker that sees only noise guesses this
        majority = token_recovery(torch.full_like(private.tokens, int(top)), private.tokens)
        grid = [(p, 0.0) for p in depths] + [(p, s) for p in noise_depths for s in settings.sigmas if s]
        nearest, learned, inverters = [], [], {}
        for p, sigma in tqdm(grid, desc="inversion (a, b)", unit="point"):
            nearest.append(_nearest(private, p, sigma, embedding, settings.seed))
            row = _learned(
                public,
                private,
                p,
                sigma,
                embedding,
                tokenizer,
                settings,
                softmax=settings.softmax_steps > 0 and p == p_run and sigma in settings.softmax_sigmas,
            )
            inverters[(p, sigma)] = row.pop("_inverter")
            learned.append(row)
            metrics.write("attack_nearest", **nearest[-1])
            metrics.write("attack_learned", **row)

        gradients = _gradients(model, p_run, q, private_b, settings)
        for row in gradients:
            metrics.write("attack_gradients", **row)
        traffic = _traffic(cfg, private_b[0], inverters[(p_run, 0.0)], embedding, int(top))
        metrics.write(
            "attack_traffic",
            **{k: v for k, v in traffic.items() if not isinstance(v, dict)},
            eavesdropper=traffic["eavesdropper"]["token_recovery"],
            readable=traffic["readable_with_global_head"]["token_recovery"],
        )
        points = _defence_points(settings, p_run, learned)
        defences = _defences(cfg, settings, points, data, tokenizer, public_b, private_b, metrics)

    settings_out = vars(settings) | {
        "run_head_layers": p_run,
        "tail_layers": q,
        "train": vars(cfg.train),
        "data": cfg.data.dataset,
        "client_silo": settings.client,
    }
    report = {
        "version": REPORT_VERSION,
        "model": cfg.model.name,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "seconds": round(time.time() - started, 1),
        "settings": settings_out,
        "baselines": {"chance": 1.0 / embedding.shape[0], "most_frequent_public_token": majority},
        "positions": {
            "public": int(public.tokens.numel()),
            "private": int(private.tokens.numel()),
            "vocab": int(embedding.shape[0]),
            "hidden": int(embedding.shape[1]),
        },
        "nearest_neighbour": nearest,
        "learned": learned,
        "gradients": gradients,
        "traffic": traffic,
        "defences": defences,
        "frontier": pareto_frontier(defences),
        "recommended": recommend(defences, settings.max_recovery, settings.max_quality_cost),
    }
    write_report(report, out)
    plot_privacy(report, out / "privacy.png")
    return report
