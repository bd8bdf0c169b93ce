"""``fedsplit generate``: local mode from a run directory, bad input, and serve / client modes over gRPC."""

from __future__ import annotations

import io

import pytest
import torch
from peft import PeftModel

from fedsplit.adapters import LoraSettings, add_part_adapters, merge_adapters, save_adapter
from fedsplit.cli import main
from fedsplit.inference import SamplingSettings
from fedsplit.models import load_model
from fedsplit.recipes.generate import GenerateJob, run_generate_local
from fedsplit.split import split_model

from tiny import randomize_adapters


@pytest.fixture
def run_dir(tmp_path):
    """A server-like run directory: adapters/{head,trunk,tail,merged} of tiny-llama with random LoRA."""
    model, _ = load_model("tiny-llama")
    parts = split_model(model, 2, 1)
    add_part_adapters(parts, [LoraSettings(r=4)] * 3, seed=0)
    randomize_adapters(parts, 0.3)
    for name in ("head", "trunk", "tail"):
        save_adapter(getattr(parts, name), tmp_path / "adapters" / name, base_model="tiny-llama")
    merge_adapters(list(parts), tmp_path / "adapters" / "merged", base_model="tiny-llama")
    return tmp_path


def test_local_mode_streams_the_greedy_answer_of_the_run_adapters(run_dir):
    out = io.StringIO()
    job = GenerateJob(["hello"], SamplingSettings(max_new_tokens=10), chat=False, run=run_dir, head_layers=2)

    answers = run_generate_local(job, out)

    base, tokenizer = load_model("tiny-llama")
    unsplit = PeftModel.from_pretrained(base, str(run_dir / "adapters" / "merged")).eval()
    ids = torch.tensor([tokenizer("hello")["input_ids"]])
    expected = unsplit.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)[0, ids.shape[1]:]
    kept = [t for t in expected.tolist() if t != tokenizer.eos_token_id]
    assert answers == [tokenizer.decode(kept, skip_special_tokens=True)]
    assert out.getvalue() == answers[0] + "\n"


def test_the_cli_refuses_a_prompt_longer_than_the_context_with_one_clear_line(run_dir, capsys):
    code = main(["generate", "--run", str(run_dir), "--no-chat", "--prompt", "x" * 300])

    err = capsys.readouterr().err
    assert code == 2
    assert "fedsplit generate: error: the prompt has 30" in err and "the model's context is 256" in err


def test_the_cli_runs_local_mode_and_prints_the_answer(run_dir, capsys):
    code = main(["generate", "--run", str(run_dir), "--prompt", "hi", "--max-new-tokens", "4", "--threads", "1"])

    assert code == 0
    assert capsys.readouterr().out.endswith("\n")


def test_a_client_generates_against_a_serving_only_server_exactly_as_locally(run_dir, tmp_path):
    import threading
    from dataclasses import replace

    from fedsplit.config import DataConfig, ModelConfig, RunConfig
    from fedsplit.configio import load_config
    from fedsplit.recipes.generate import run_generate_client, run_serve
    from fedsplit.recipes.network import free_port, write_federation

    lora = LoraSettings(r=4)
    cfg = RunConfig(model=ModelConfig(name="tiny-llama", head_layers=2, tail_layers=1), lora_head=lora,
                    lora_trunk=lora, lora_tail=lora, data=DataConfig(num_clients=2))
    cfg = replace(cfg, server=replace(cfg.server, address=f"127.0.0.1:{free_port()}"))
    server_toml, client_tomls = write_federation(cfg, tmp_path / "fed")
    server_cfg, client_cfg = load_config(RunConfig, server_toml, []), load_config(RunConfig, client_tomls[0], [])
    started, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=run_serve, args=(server_cfg, server_toml.parent, run_dir),
                              kwargs={"ready": lambda server: started.set(), "stop": stop}, daemon=True)
    thread.start()
    assert started.wait(30)
    job = GenerateJob(["hello", "bye"], SamplingSettings(max_new_tokens=8), run=run_dir, head_layers=2)

    try:
        remote = run_generate_client(job, client_cfg, client_tomls[0].parent, io.StringIO())
    finally:
        stop.set()
        thread.join(10)

    assert remote == run_generate_local(job, io.StringIO())
