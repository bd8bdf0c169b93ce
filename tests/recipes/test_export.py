"""``fedsplit export``: the exported model, loaded by plain transformers without fedsplit, generates
exactly what the split model (head -> trunk -> tail with the three trained adapters) generates."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fedsplit.adapters import add_part_adapters, save_adapter
from fedsplit.models import load_model
from fedsplit.recipes.export import ExportError, ExportJob, infer_cut, run_export
from fedsplit.split import positions_from_mask, split_model
from fedsplit.train.config import LoraSettings

PROMPT = "the cat sat"
NEW_TOKENS = 12

# Run with fedsplit made unimportable: -I drops PYTHONPATH and user site; the finder refuses the
# editable install the venv may hold.
_NO_FEDSPLIT = """
import importlib.abc, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fedsplit" or name.startswith("fedsplit."):
            raise ImportError("fedsplit is not installed here")
sys.meta_path.insert(0, _Refuse())
try:
    import fedsplit
    raise SystemExit("fedsplit importable")
except ImportError:
    pass
import json, torch
torch.set_num_threads(1)
"""


def _plain_transformers(script: str) -> dict:
    code = _NO_FEDSPLIT + textwrap.dedent(script)
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, list[int], list[int]]:
    """A run directory with non-trivial head/trunk/tail adapters of tiny-llama, the prompt's ids and
    the split model's greedy continuation."""
    run = tmp_path_factory.mktemp("run")
    model, tokenizer = load_model("tiny-llama")
    parts = split_model(model, head_layers=2, tail_layers=1)
    add_part_adapters(parts, [LoraSettings(r=4), LoraSettings(r=8, alpha=8.0), LoraSettings(r=4)], seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: give every adapter weight a value so the merge matters
        for part in parts:
            for name, param in part.named_parameters():
                if "lora_" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    for name, part in zip(("head", "trunk", "tail"), parts, strict=True):
        save_adapter(part, run / "adapters" / name, base_model="tiny-llama")
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    return run, ids[0].tolist(), _split_greedy(parts, ids, tokenizer.eos_token_id)


@torch.no_grad()
def _split_greedy(parts, ids: torch.Tensor, eos: int) -> list[int]:
    """Greedy decoding through the cut, re-running the whole prefix for each new token."""
    out = ids.clone()  # (1, T)
    for _ in range(NEW_TOKENS):
        mask = torch.ones_like(out)
        positions = positions_from_mask(mask)
        hidden = parts.trunk(parts.head(out, mask, positions), mask, positions)  # (1, T, H) across both cuts
        token = int(parts.tail(hidden, mask, positions)[0, -1].argmax())
        out = torch.cat([out, torch.tensor([[token]])], dim=1)
        if token == eos:
            break
    return out[0, ids.shape[1]:].tolist()


def test_merged_model_generates_like_the_split_model_in_plain_transformers(trained_run, tmp_path):
    run, prompt_ids, split_tokens = trained_run
    out = run_export(ExportJob(out=tmp_path / "model", run=run))

    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    result = _plain_transformers(f"""
        from transformers import AutoModelForCausalLM, pipeline
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        ids = torch.tensor([{prompt_ids!r}])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens={NEW_TOKENS}, do_sample=False)
        text = pipeline("text-generation", model={str(out)!r})("the", max_new_tokens=3, do_sample=False)
        print(json.dumps({{"tokens": new[0, ids.shape[1]:].tolist(), "text": text[0]["generated_text"],
                           "lora": any("lora" in k for k in model.state_dict())}}))
    """)
    assert result["tokens"] == split_tokens
    assert result["text"].startswith("the") and not result["lora"]


def test_the_adapters_matter(trained_run):
    """The comparison can fail: the base model alone continues the prompt differently."""
    _, prompt_ids, split_tokens = trained_run
    base, _ = load_model("tiny-llama")
    ids = torch.tensor([prompt_ids])
    plain = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert plain[0, ids.shape[1]:].tolist() != split_tokens


def test_adapter_only_loads_with_auto_peft_model_and_no_fedsplit(trained_run, tmp_path):
    run, prompt_ids, split_tokens = trained_run
    out = run_export(ExportJob(out=tmp_path / "adapter", head=run / "adapters/head", trunk=run / "adapters/trunk",
                               tail=run / "adapters/tail", adapter_only=True))

    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_path).is_absolute() and (Path(base_path) / "config.json").is_file()
    result = _plain_transformers(f"""
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({str(out)!r})
        ids = torch.tensor([{prompt_ids!r}])
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens={NEW_TOKENS},
                             do_sample=False)
        print(json.dumps({{"tokens": new[0, ids.shape[1]:].tolist()}}))
    """)
    assert result["tokens"] == split_tokens


def test_missing_parts_are_named(tmp_path):
    with pytest.raises(ExportError, match="--head, --trunk and --tail"):
        run_export(ExportJob(out=tmp_path / "x", run=tmp_path))
    with pytest.raises(ExportError, match="either --run or all three"):
        run_export(ExportJob(out=tmp_path / "x", head=tmp_path))


def test_infer_cut_reads_the_block_indices():
    head = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    tail = ["model.layers.5.self_attn.q_proj"]
    assert infer_cut(head, tail, 6) == (2, 1)
    with pytest.raises(ExportError, match="right base model"):
        infer_cut(head, ["model.layers.4.self_attn.q_proj"], 6)


def test_the_export_subcommand(trained_run, tmp_path, capsys):
    from fedsplit.cli import main

    run, _, _ = trained_run

    assert main(["export", "--run", str(run), "--out", str(tmp_path / "a"), "--adapter-only"]) == 0
    assert "exported adapter" in capsys.readouterr().out
    assert main(["export", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2
    assert "no head/, trunk/ and tail/ adapters" in capsys.readouterr().err
