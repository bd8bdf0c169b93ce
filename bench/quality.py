"""The FL-GLM comparison (arXiv 2406.14898) at small scale: zero-shot, local-only, federated split
(IID and Dirichlet label skew) and centralized LoRA fine-tuning of SmolLM2-135M on RTE, CB, COPA,
BoolQ and SAMSum, all with the same examples seen and the same hyper-parameters.

    python bench/quality.py                 # the full comparison (about an hour on 2 CPU cores)
    python bench/quality.py --quick         # tiny random model, tiny data: seconds (the tests run it)
    python bench/quality.py --resume        # a cut-short run: keep the tasks it measured, run the rest

Writes quality.json, quality.md and quality.png to --out and prints one JSON line last with
``mean_accuracy_gap_points`` (centralized minus federated, classification, x100) and
``rouge_l_gap`` (SAMSum ROUGE-L, x100), for the first partition; other partitions get a suffix.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fedsplit.data.shared import shared_data_dir
from fedsplit.recipes.quality import QualityConfig, run_quality, threads

QUICK = dict(model="tiny-llama", tasks=("cb", "samsum"), rounds=2, local_steps=2, batch_size=2, max_length=64,
             max_eval=6, samsum_test=6, max_new_tokens=8, lora_r=4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model and tiny data (seconds)")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--shared", type=Path, help="shared data directory (default: $FEDSPLIT_SHARED/data)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or 2)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="keep the tasks already in --out/quality.json (same settings) and run the others")
    for name, default in QualityConfig.__dataclass_fields__.items():
        if name in ("progress",):
            continue
        value = default.default if not callable(default.default_factory) else default.default_factory()
        kind = type(value)
        if kind is tuple:
            parser.add_argument(f"--{name.replace('_', '-')}", type=lambda s: tuple(s.split(",")))
        elif kind is bool:
            parser.add_argument(f"--{name.replace('_', '-')}", type=lambda s: s.lower() in ("1", "true", "yes"))
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind)
    args = parser.parse_args(argv)
    threads(args.threads)
    given = {k: v for k, v in vars(args).items() if k in QualityConfig.__dataclass_fields__ and v is not None}
    cfg = QualityConfig(**({**QUICK, **given} if args.quick else given), progress=not args.no_progress)
    shared = args.shared or shared_data_dir()
    if shared is None:
        raise SystemExit("bench/quality.py: shared data not found; set FEDSPLIT_SHARED (its data/ dir) or --shared")
    summary = run_quality(cfg, shared, args.out, resume=args.resume) | {"threads": args.threads, "quick": args.quick}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
