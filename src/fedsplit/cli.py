"""``fedsplit`` command line: one subcommand per job; each parses flags and calls a recipe.

Nothing runs at import; ``main()`` is the console-script entry point.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML run configuration (see `fedsplit config`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one configuration value (repeatable), e.g. --set train.lr=1e-4")
    parser.add_argument("--model", help="shortcut for --set model.name=NAME")
    parser.add_argument("--out", type=Path, help="run directory (metrics.jsonl, adapters, config, plots)")


def _load_run_config(args: argparse.Namespace):
    from fedsplit.config import RunConfig
    from fedsplit.configio import load_config

    overrides = list(args.overrides) + ([f"model.name={args.model}"] if args.model else [])
    return load_config(RunConfig, args.config, overrides)


def cmd_check_split(args: argparse.Namespace) -> int:
    import torch

    from fedsplit.models import load_model
    from fedsplit.recipes.check_split import check_split
    from fedsplit.split import num_blocks

    torch.manual_seed(args.seed)
    worst_ok = True
    for name in args.model.split(","):
        model, _ = load_model(name)
        result = check_split(model, args.head_layers, args.tail_layers, train_steps=args.train_steps,
                             tolerance=args.tolerance, seed=args.seed)
        print(f"{name}: {num_blocks(model)} blocks, head {args.head_layers} / trunk / tail {args.tail_layers}")
        print(f"  max |logit diff|             {result.logits:.3e}")
        print(f"  max |grad diff|              {result.grads:.3e}")
        if result.params_after_training is not None:
            print(f"  max |param diff| after {args.train_steps} LoRA steps  {result.params_after_training:.3e}")
        print(f"  {'OK' if result.ok else 'FAIL'} (tolerance {args.tolerance:g})")
        worst_ok &= result.ok
    return 0 if worst_ok else 1


def cmd_centralized(args: argparse.Namespace) -> int:
    cfg = _load_run_config(args)  # a configuration error shows before torch is imported
    from fedsplit.metrics import MetricsWriter
    from fedsplit.plots import plot_loss_curves
    from fedsplit.recipes.centralized import run_centralized
    from fedsplit.recipes.common import load_federated_data, prepare_run_dir

    out = prepare_run_dir(args.out or Path("runs/centralized"), cfg)
    data = load_federated_data(cfg.data, cfg.train.seed)
    with MetricsWriter(out / "metrics.jsonl") as metrics:
        result = run_centralized(cfg, data, out, metrics)
    plot_loss_curves({"centralized": result.losses}, out / "loss.png",
                     title=f"centralized {cfg.method.name}, {cfg.model.name}")
    rouge = "n/a" if result.eval.rouge_l is None else f"{result.eval.rouge_l:.4f}"
    print(f"held-out loss {result.eval.loss:.4f}  ROUGE-L {rouge}  -> {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = _load_run_config(args)
    from fedsplit.recipes.demo import run_demo

    return run_demo(cfg, args.out or Path("runs/demo"))


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    import torch

    from fedsplit.data import SourceConfig
    from fedsplit.eval.evaluator import EvalSettings
    from fedsplit.recipes.eval_task import STDLIB_DOCS, EvalRun, run_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    mapping = {}
    if args.prompt_template:
        mapping = {"prompt_template": args.prompt_template, "response_field": args.response_field,
                   "verbalizer": json.loads(args.verbalizer) if args.verbalizer else None}
    elif not args.task and args.data != STDLIB_DOCS:
        raise ValueError("eval: expected --task or --prompt-template/--response-field (and --verbalizer to classify)")
    source = None if args.data == STDLIB_DOCS else SourceConfig(path=args.data, task=args.task, limit=args.limit,
                                                                **mapping)
    settings = EvalSettings(max_length=args.max_length, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            exact_match=not args.no_exact_match, seed=args.seed)
    run_eval(EvalRun(source, model=args.model, run=args.run, json_out=args.json, limit=args.limit), settings)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from fedsplit.recipes.keygen import run_keygen
    from fedsplit.security.identity import DEFAULT_TLS_HOSTS
    from fedsplit.security.pki import run_issue_client_cert

    hosts = [h.strip() for value in args.hosts for h in value.split(",") if h.strip()]
    if hosts and not args.ca:
        raise SystemExit("fedsplit keygen: error: --host names the server certificate's hosts: it needs --ca")
    # the hosts asked for first (the first is the certificate's common name), then the loopback names
    hosts = list(dict.fromkeys([*hosts, *DEFAULT_TLS_HOSTS]))
    written = run_keygen(args.out, args.name, with_ca=args.ca, hosts=hosts)
    if args.client_cert:
        written += run_issue_client_cert(args.out, args.name)
    for path in written:
        print(path)
    return 0


def _network_config(args: argparse.Namespace):
    from dataclasses import replace

    cfg = _load_run_config(args)
    if cfg.security.insecure and not args.insecure:
        raise SystemExit("security.insecure = true: running without TLS also needs the explicit --insecure flag")
    cfg = replace(cfg, security=replace(cfg.security, insecure=args.insecure))
    config_dir = args.config.resolve().parent if args.config else Path.cwd()
    return cfg, config_dir


def cmd_server(args: argparse.Namespace) -> int:
    cfg, config_dir = _network_config(args)  # a configuration error shows before torch is imported
    from fedsplit.recipes.network import run_server

    return run_server(cfg, config_dir, args.out or Path("runs/server"), resume=args.resume)


def cmd_client(args: argparse.Namespace) -> int:
    cfg, config_dir = _network_config(args)
    from fedsplit.recipes.network import run_client

    return run_client(cfg, config_dir, args.out or Path(f"runs/{cfg.client.id}"))


def cmd_simulate(args: argparse.Namespace) -> int:
    cfg, _ = _network_config(args)
    from fedsplit.recipes.simulate import run_simulate  # the federation, then its table, metrics and loss plot

    return run_simulate(cfg, args.out or Path("runs/simulate"))


def cmd_subserver(args: argparse.Namespace) -> int:
    from fedsplit.recipes.hierarchy import read_spec
    from fedsplit.recipes.subserver import run_subserver

    return run_subserver(read_spec(args.root_config), args.rank)


def cmd_audit_inverter(args: argparse.Namespace) -> int:
    import json

    from fedsplit.recipes.audit_inverter import fit_audit_inverter

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = _load_run_config(args)
    out = args.out or Path("runs/audit-inverter.safetensors")
    print(json.dumps(fit_audit_inverter(cfg, out, positions=args.positions)))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    import json

    from fedsplit.attacks.config import AttackSettings, quick_settings
    from fedsplit.recipes.attack import run_attack

    if args.quick and not args.model:
        args.model = "tiny-llama"
    cfg = _load_run_config(args)
    names = ("client", "head_depths", "noise_depths", "sigmas", "public_positions", "private_positions",
             "softmax_steps", "softmax_sigmas", "gradient_batches", "matching_steps", "gradient_sigmas",
             "quality_steps", "quality_sigmas", "adversarial_weights", "adversarial_sigma",
             "extra_points", "threads")
    flags = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    settings = quick_settings(**flags) if args.quick else AttackSettings(**flags)
    report = run_attack(cfg, settings, args.out or Path("runs/attack"))
    best = report["recommended"]
    print(json.dumps({"recommended": best["name"], "token_recovery": best["token_recovery"],
                      "quality_cost": best["quality_cost"], "meets_target": best["meets_target"]}))
    return 0


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from fedsplit.inference import SamplingSettings
    from fedsplit.recipes.generate import GenerateJob, run_generate_client, run_generate_local, run_serve

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.serve:
        cfg, config_dir = _network_config(args)
        return run_serve(cfg, config_dir, args.run)
    try:
        settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, stop=tuple(args.stop), seed=args.seed)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    prompts = list(args.prompt) or ([sys.stdin.read()] if not sys.stdin.isatty() else [])
    job = GenerateJob(prompts, settings, chat=args.chat, model=args.model, run=args.run,
                      head_layers=args.head_layers, tail_layers=args.tail_layers)
    if args.server:
        cfg, config_dir = _network_config(args)
        run_generate_client(job, cfg, config_dir)
    else:
        run_generate_local(job)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedsplit.recipes.export import ExportJob, run_export

    out = run_export(ExportJob(out=args.out, run=args.run, head=args.head, trunk=args.trunk, tail=args.tail,
                               model=args.model, adapter_only=args.adapter_only))
    print(f"exported {'adapter' if args.adapter_only else 'merged model'} -> {out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fedsplit.config import RunConfig, describe
    from fedsplit.configio import dump_config

    print("\n".join(describe()) if args.describe else dump_config(RunConfig()), end="\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsplit", description="Federated split fine-tuning of LLMs (FL-GLM).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-split", help="prove a cut is exact: logits, gradients, LoRA training")
    p.add_argument("--model", default="tiny-llama", help="model name(s), comma-separated")
    p.add_argument("--head-layers", type=int, default=1)
    p.add_argument("--tail-layers", type=int, default=1)
    p.add_argument("--train-steps", type=int, default=0, help="also compare K LoRA steps split vs centralized")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_check_split)

    p = sub.add_parser("centralized", help="the centralized baseline ([method]: LoRA or prefixes) on the pooled data")
    _config_args(p)
    p.set_defaults(func=cmd_centralized)

    p = sub.add_parser("demo", help="zero-shot vs federated split vs centralized on the stdlib-docs silos")
    _config_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval",
                       help="accuracy/macro-F1/exact match or loss/ROUGE of a model on a task, with 95 % intervals")
    p.add_argument("--data", required=True,
                   help="held-out file (jsonl/json/csv/parquet or hf://...), or stdlib-docs (the demo's held-out set)")
    p.add_argument("--task", help="rte, cb, copa, boolq, emotion (classification); samsum, alpaca (generation)")
    p.add_argument("--model", help="base model (default: the run adapter's base model, else smollm2-135m)")
    p.add_argument("--run", type=Path,
                   help="run directory (its merged LoRA or prefix adapter) or an adapter directory; none: zero-shot")
    p.add_argument("--limit", type=int, help="evaluate the first N examples")
    p.add_argument("--json", type=Path, help="write metrics, intervals and per-example predictions here")
    p.add_argument("--prompt-template", help="your own task: '{field}' prompt template (instead of --task)")
    p.add_argument("--response-field", help="your own task: the field with the response or label")
    p.add_argument("--verbalizer", help='your own classification task: JSON {"label": "answer text", ...}')
    p.add_argument("--max-length", type=int, default=256, help="tokens per scored sequence (prompt cut from the left)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation tasks: greedy answer length")
    p.add_argument("--no-exact-match", action="store_true", help="classification: skip greedy generation")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("keygen", help="an Ed25519 identity; with --ca also a TLS CA and server certificate")
    p.add_argument("--out", type=Path, required=True, help="directory for the key files")
    p.add_argument("--name", default="server", help="key pair name: server, or a client id")
    p.add_argument("--ca", action="store_true", help="also a CA (ca.key/ca.crt) and a server TLS certificate")
    p.add_argument("--client-cert", action="store_true",
                   help="also a mutual-TLS certificate for client NAME from the CA in --out")
    p.add_argument("--host", dest="hosts", action="append", default=[], metavar="HOST[,HOST]",
                   help="with --ca: a DNS name or IP address clients dial the server by (repeatable, comma-separated); "
                        "127.0.0.1, localhost and ::1 are always included")
    p.set_defaults(func=cmd_keygen)

    for name, func, text in (("server", cmd_server, "run the server: trunk, rounds, aggregation"),
                             ("client", cmd_client, "run one client: head, tail and its own data"),
                             ("simulate", cmd_simulate, "one server and N clients as processes on 127.0.0.1")):
        p = sub.add_parser(name, help=text)
        _config_args(p)
        p.add_argument("--insecure", action="store_true", help="no TLS (frames stay AES-GCM sealed); prints a warning")
        if name == "server":
            p.add_argument("--resume", action="store_true", help="continue from the last round checkpoint in --out")
        p.set_defaults(func=func)

    p = sub.add_parser("subserver", help="one trunk replica of a server-hierarchical run (started by the root)")
    p.add_argument("--root-config", type=Path, required=True, help="hierarchy.toml written by the root server")
    p.add_argument("--rank", type=int, required=True, help="this sub-server's rank, 1..K")
    p.set_defaults(func=cmd_subserver)

    p = sub.add_parser("attack", help="privacy attacks on a run's configuration: privacy_report.json, privacy.png")
    _config_args(p)
    p.add_argument("--quick", action="store_true", help="seconds on a tiny model (tiny-llama unless --model)")
    p.add_argument("--client", type=int, help="whose silo is the private data (default 0)")
    p.add_argument("--head-depths", type=_ints, help="head depths p attacked, e.g. 0,1,2,4")
    p.add_argument("--noise-depths", type=_ints, help="depths the sigma sweep runs at (default: the run's p)")
    p.add_argument("--sigmas", type=_floats, help="noise sigmas swept, must include 0")
    p.add_argument("--public-positions", type=int, help="public tokens the learned inverter is fitted on")
    p.add_argument("--private-positions", type=int, help="private tokens attacked")
    p.add_argument("--softmax-steps", type=int, help="softmax inverter steps (0 = ridge only)")
    p.add_argument("--softmax-sigmas", type=_floats, help="sigmas where the softmax inverter runs (at the run's p)")
    p.add_argument("--gradient-batches", type=int, help="private batches attacked through their gradients")
    p.add_argument("--matching-steps", type=int, help="gradient-matching (TAG/LAMP) optimisation steps")
    p.add_argument("--gradient-sigmas", type=_floats, help="sigmas for the gradient attack")
    p.add_argument("--quality-steps", type=int, help="LoRA steps per quality-cost fine-tune")
    p.add_argument("--quality-sigmas", type=_floats, help="noise levels fine-tuned for their quality cost")
    p.add_argument("--adversarial-weights", type=_floats, help="adversarial head-training weights fine-tuned")
    p.add_argument("--adversarial-sigma", type=float, help="noise under the adversarial head")
    p.add_argument("--extra-points", type=lambda t: tuple(t.split(",")),
                   help="more fine-tuned defences as p:sigma, e.g. 4:2.0,2:8")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("audit-inverter", help="fit the learned inverter of the in-run privacy audit on public text "
                                              "(for [privacy] audit_inverter)")
    _config_args(p)
    p.add_argument("--positions", type=int, default=100_000, help="public tokens the ridge map is fitted on")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.set_defaults(func=cmd_audit_inverter)

    p = sub.add_parser("generate", help="generate text across the cut, each party keeping its own KV cache")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: stdin)")
    p.add_argument("--run", type=Path, help="run or adapter directory: its adapters (none: the base model)")
    p.add_argument("--model", help="local mode: base model (default: the run adapter's base model)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not shown")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="use the tokenizer's chat template (default: when it has one)")
    p.add_argument("--head-layers", type=int, default=1, help="local mode: the cut (the text does not depend on it)")
    p.add_argument("--tail-layers", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--server", action="store_true",
                   help="client mode: the trunk of the running `fedsplit server` of --config (a client TOML)")
    p.add_argument("--serve", action="store_true",
                   help="serve generation only (--config: the server TOML; --run: the trunk adapter)")
    p.add_argument("--config", type=Path, help="TOML run configuration (client or server modes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--insecure", action="store_true", help="no TLS (frames stay AES-GCM sealed)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="a run's head/trunk/tail adapters as one Hugging Face model (or PEFT adapter)")
    p.add_argument("--run", type=Path, help="run directory holding adapters/{head,trunk,tail}")
    p.add_argument("--head", type=Path, help="a client's head adapter (instead of --run)")
    p.add_argument("--trunk", type=Path, help="the server's trunk adapter (instead of --run)")
    p.add_argument("--tail", type=Path, help="a client's tail adapter (instead of --run)")
    p.add_argument("--model", help="base model (default: the adapters' base_model_name_or_path)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--adapter-only", action="store_true",
                   help="write the merged PEFT adapter (and, for a fedsplit model name, the base model in out/base)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("config", help="print the default run configuration as TOML")
    p.add_argument("--describe", action="store_true", help="one line per field with its help text")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:
        return int(args.func(args) or 0)
    from fedsplit.security.errors import SecurityError  # light: exception classes only

    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, ConnectionError, OSError, SecurityError) as exc:
        # Errors of the user's input or environment: one clear line, not a traceback (-v shows it).
        print(f"fedsplit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
