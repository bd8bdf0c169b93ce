"""How the learned inversion (ridge onto the embeddings + nearest neighbour) grows with the attacker's public text.

    python bench/attack_scaling.py --model smollm2-135m --head-layers 1,2,4,8 --positions 5000,20000,100000 --sigmas 0,8

Private data: client 0's stdlib-docs silo, tokenized as training does, or with ``--private-text FILE:FIELD``
plain sentences from a JSONL file (e.g. superglue/rte/val.jsonl:premise under the shared data). Prints one
JSON line last.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--head-layers", default="1", help="head depths p, comma-separated")
    parser.add_argument("--positions", default="5000,20000,100000", help="public token counts, comma-separated")
    parser.add_argument("--sigmas", default="0,8", help="noise sigmas, comma-separated")
    parser.add_argument("--private-positions", type=int, default=1200)
    parser.add_argument("--private-text", default="", help="FILE:FIELD of a JSONL file (relative to the shared data)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from fedsplit.attacks.corpus import collect, private_batches, public_sequences, sequence_batches
    from fedsplit.attacks.hidden import embedding_matrix
    from fedsplit.attacks.inversion import RidgeInverter, token_recovery
    from fedsplit.data import shared_data_dir, stdlib_docs_silos
    from fedsplit.models import load_model

    started = time.time()
    model, tokenizer = load_model(args.model)
    model.requires_grad_(False)
    embedding = embedding_matrix(model)
    depths, counts = [int(v) for v in args.head_layers.split(",")], [int(v) for v in args.positions.split(",")]
    sigmas = [float(v) for v in args.sigmas.split(",")]
    shared = shared_data_dir()
    if shared is None:
        raise SystemExit("shared data not found: set FEDSPLIT_SHARED")
    if args.private_text:
        name, field = args.private_text.rsplit(":", 1)
        lines = (shared / name).read_text(encoding="utf-8").splitlines()
        texts = [json.loads(line)[field] for line in lines if line.strip()]
        ids, total = [], 0
        for text in texts:
            if total >= args.private_positions:
                break
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][:128])
            total += len(ids[-1])
        private = collect(model, depths, sequence_batches(ids, 8, tokenizer.pad_token_id), desc="private")
    else:
        silo = stdlib_docs_silos(3, 0.1, 0).silos[0]
        private = collect(
            model, depths, private_batches(silo, tokenizer, 128, 4, args.private_positions), desc="private"
        )
    sequences = public_sequences(tokenizer, shared, max(counts), 64)
    public = collect(model, depths, sequence_batches(sequences, 16, tokenizer.pad_token_id), desc="public")
    rows = []
    for p in depths:
        for sigma in sigmas:
            g = torch.Generator().manual_seed(0)
            pub = public.hidden[p] + sigma * torch.randn(public.hidden[p].shape, generator=g)
            priv = private.hidden[p] + sigma * torch.randn(private.hidden[p].shape, generator=g)
            for count in counts:
                inverter = RidgeInverter.fit(pub[:count], public.tokens[:count], embedding)
                recovery = token_recovery(inverter.predict(priv), private.tokens)
                rows.append(
                    {"head_layers": p, "public_positions": count, "noise_std": sigma, "token_recovery": recovery}
                )
                n = private.tokens.numel()
                print(f"p={p} sigma={sigma:g} public={count:>6}: {100 * recovery:.1f} % of {n} tokens", flush=True)
    private_name = args.private_text or "stdlib-docs silo 0"
    seconds = round(time.time() - started, 1)
    print(json.dumps({"model": args.model, "private": private_name, "rows": rows, "seconds": seconds}))


if __name__ == "__main__":
    main()
