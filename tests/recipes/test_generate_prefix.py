"""``fedsplit generate`` on a P-tuning v2 run: local mode from ``adapters/prefix``, and client / serve over gRPC."""

from __future__ import annotations

import io
import threading
from dataclasses import replace

import pytest
import torch

from fedsplit.cli import main
from fedsplit.inference import LocalTrunk, SamplingSettings, SplitGenerator
from fedsplit.models import load_model
from fedsplit.recipes.generate import GenerateJob, run_generate_local
from fedsplit.split import split_model
from fedsplit.split.prefix import (
    PrefixError,
    add_part_prefixes,
    load_prefix_adapter,
    peft_prefix_table,
    save_part_prefixes,
    save_prefix_adapter,
)

P = 3


@pytest.fixture
def prefix_run(tmp_path):
    """A prefix run's server directory: adapters/prefix of tiny-llama (cut 2 | 1) with random prefixes,
    and the parts that wrote it."""
    model, tokenizer = load_model("tiny-llama")
    parts = split_model(model, 2, 1)
    add_part_prefixes(parts, P, seed=4, init_std=1.0)  # far from zero, as trained prefixes can be
    save_prefix_adapter(list(parts), tmp_path / "run" / "adapters" / "prefix", base_model="tiny-llama")
    return tmp_path / "run", parts, tokenizer


def test_local_mode_generates_with_the_runs_prefixes(prefix_run):
    run, parts, tokenizer = prefix_run
    job = GenerateJob(["hello", "bye"], SamplingSettings(max_new_tokens=10), chat=False, run=run, head_layers=1,
                      tail_layers=2)  # another cut than the run's: the adapter holds every block's prefixes
    out = io.StringIO()

    answers = run_generate_local(job, out)

    writer = SplitGenerator(parts.head, parts.tail, LocalTrunk(parts.trunk), tokenizer)
    assert answers == [writer.generate(prompt, job.settings, chat=False) for prompt in job.prompts]
    assert out.getvalue() == f"### 1\n{answers[0]}\n### 2\n{answers[1]}\n"
    plain = split_model(load_model("tiny-llama")[0], 1, 2)  # no prefixes: other answers
    untuned = SplitGenerator(plain.head, plain.tail, LocalTrunk(plain.trunk), tokenizer)
    assert answers != [untuned.generate(prompt, job.settings, chat=False) for prompt in job.prompts]


def test_a_loaded_adapter_gives_each_part_its_own_blocks_prefixes(prefix_run):
    run, parts, _ = prefix_run
    fresh = split_model(load_model("tiny-llama")[0], 1, 2)

    width = load_prefix_adapter([fresh.head, fresh.tail], run / "adapters" / "prefix")  # a client: head and tail
    load_prefix_adapter([fresh.trunk], run / "adapters" / "prefix")  # the server: its trunk

    assert width == P
    assert torch.equal(peft_prefix_table(fresh), peft_prefix_table(parts))
    with pytest.raises(PrefixError, match="expected a PEFT prefix-tuning adapter"):
        (run / "lora").mkdir()
        (run / "lora" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        load_prefix_adapter([fresh.head], run / "lora")


def test_the_cli_runs_local_mode_on_a_prefix_run_and_counts_the_prefix_in_the_context(prefix_run, capsys):
    run, _, _ = prefix_run

    assert main(["generate", "--run", str(run), "--prompt", "hi", "--max-new-tokens", "4", "--threads", "1"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    code = main(["generate", "--run", str(run), "--no-chat", "--prompt", "x" * 300])

    err = capsys.readouterr().err
    assert code == 2
    assert f"(+ {P} prefix positions); the model's context is 256" in err


def test_a_client_generates_against_a_serving_only_prefix_server_exactly_as_locally(prefix_run, tmp_path):
    from fedsplit.config import DataConfig, MethodConfig, ModelConfig, RunConfig
    from fedsplit.configio import load_config
    from fedsplit.recipes.generate import run_generate_client, run_serve
    from fedsplit.recipes.network import CLIENT_PREFIX, free_port, write_federation

    run, parts, _ = prefix_run
    own = tmp_path / "client-0"  # what fedsplit client keeps of a prefix run: its head and tail prefixes only
    save_part_prefixes([parts.head, parts.tail], own / "adapters" / CLIENT_PREFIX, base_model="tiny-llama")
    cfg = RunConfig(model=ModelConfig(name="tiny-llama", head_layers=2, tail_layers=1),
                    method=MethodConfig(name="prefix", num_virtual_tokens=P), data=DataConfig(num_clients=2))
    cfg = replace(cfg, server=replace(cfg.server, address=f"127.0.0.1:{free_port()}"))
    server_toml, client_tomls = write_federation(cfg, tmp_path / "fed")
    server_cfg, client_cfg = load_config(RunConfig, server_toml, []), load_config(RunConfig, client_tomls[0], [])
    job = GenerateJob(["hello", "bye"], SamplingSettings(max_new_tokens=8), run=run, head_layers=2)
    with pytest.raises(FileNotFoundError, match="pass --run with the run's P-tuning v2 adapter"):
        run_serve(server_cfg, server_toml.parent, None)
    started, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=run_serve, args=(server_cfg, server_toml.parent, run),
                              kwargs={"ready": lambda server: started.set(), "stop": stop}, daemon=True)
    thread.start()
    assert started.wait(30)

    try:
        with pytest.raises(FileNotFoundError, match="the head/tail prefixes a run starts from are random"):
            run_generate_client(replace(job, run=None), client_cfg, client_tomls[0].parent, io.StringIO())
        remote = run_generate_client(job, client_cfg, client_tomls[0].parent, io.StringIO())
        from_own = run_generate_client(replace(job, run=own), client_cfg, client_tomls[0].parent, io.StringIO())
    finally:
        stop.set()
        thread.join(10)

    assert remote == from_own == run_generate_local(job, io.StringIO())
