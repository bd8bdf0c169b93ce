from __future__ import annotations

import copy
import warnings

import pytest
import torch

from fedsplit.config import MethodConfig
from fedsplit.split import split_model
from fedsplit.split.check import check_batch, vocab_size
from fedsplit.split.parts import positions_from_mask
from fedsplit.split.prefix import (
    PREFIX_INIT_STD,
    PrefixError,
    add_part_prefixes,
    load_peft_prefix_table,
    part_prefix,
    peft_prefix_config,
    peft_prefix_table,
)

P = 3


def _peft(model: torch.nn.Module, tokens: int = P):
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, peft_prefix_config(tokens))


def _table(peft_model) -> torch.nn.Parameter:
    return peft_model.prompt_encoder["default"].embedding.weight  # (P, layers * 2 * kv_heads * head_dim)


def _batch(model, side: str = "left", seed: int = 0) -> dict[str, torch.Tensor]:
    return check_batch(vocab_size(model), side, torch.Generator().manual_seed(seed), seq=10)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_split_prefix_forward_backward_equals_peft_prefix_tuning(tiny_models, name):
    model = copy.deepcopy(tiny_models[name][0]).float()
    peft_model = _peft(model)
    parts = split_model(peft_model.get_base_model(), 2, 1)
    add_part_prefixes(parts, P, seed=5, init_std=1.0)  # far from zero, as trained prefixes can be
    with torch.no_grad():
        _table(peft_model).copy_(peft_prefix_table(parts))  # the same starting prefixes on both sides
    batch = _batch(model)
    mask, ids = batch["attention_mask"], batch["input_ids"]
    positions = positions_from_mask(mask)
    weights = torch.randn(*ids.shape, vocab_size(model), generator=torch.Generator().manual_seed(1))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT passes the deprecated past_key_values name
        reference = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    (reference * weights).sum().backward()
    hidden = parts.head(ids, mask, positions)
    hidden = parts.trunk(hidden, mask, positions)
    logits = parts.tail(hidden, mask, positions)
    (logits * weights).sum().backward()

    keep = mask.bool()
    assert (logits - reference)[keep].abs().max().item() <= 1e-5
    grads = peft_prefix_table(parts, grad=True)
    assert grads.abs().max().item() > 0
    assert (grads - _table(peft_model).grad).abs().max().item() <= 1e-5


def test_prefixes_change_the_output_and_live_on_their_parts(tiny_models):
    model = copy.deepcopy(tiny_models["tiny-llama"][0]).float()
    batch = _batch(model, "right")
    mask, positions = batch["attention_mask"], positions_from_mask(batch["attention_mask"])
    parts = split_model(model, 1, 1)
    plain = parts.tail(parts.trunk(parts.head(batch["input_ids"], mask, positions), mask, positions), mask, positions)

    add_part_prefixes(parts, P, seed=0, init_std=1.0)
    prefixed = parts.tail(parts.trunk(parts.head(batch["input_ids"], mask, positions), mask, positions),
                          mask, positions)

    assert (plain - prefixed).abs().max().item() > 1e-3
    for part in parts:
        names = [n for n, p in part.named_parameters() if p.requires_grad]
        expected = {f"prefix_tuning.{kind}.{layer}" for kind in ("key", "value") for layer in part.layer_indices}
        assert set(names) == expected
    prefix = part_prefix(parts.trunk)
    assert prefix is not None
    assert tuple(prefix.key["1"].shape) == (model.config.num_key_value_heads, P, model.config.head_dim)


def test_peft_table_round_trips_and_rejects_a_wrong_shape(tiny_models):
    model = copy.deepcopy(tiny_models["tiny-llama"][0])
    parts = split_model(model, 1, 1)
    add_part_prefixes(parts, P, seed=0)
    table = torch.randn_like(peft_prefix_table(parts))

    load_peft_prefix_table(parts, table)

    assert torch.equal(peft_prefix_table(parts), table)
    with pytest.raises(PrefixError, match="expected shape"):
        load_peft_prefix_table(parts, table[:, 1:])


def test_part_prefixes_round_trip_into_the_parts_saved_and_name_the_blocks_others_lack(tiny_models, tmp_path):
    from fedsplit.split.prefix import load_part_prefixes, save_part_prefixes

    model = tiny_models["tiny-llama"][0]
    trained = split_model(copy.deepcopy(model), 1, 1)
    add_part_prefixes(trained, P, seed=3)
    save_part_prefixes([trained.head, trained.tail], tmp_path / "mine", base_model="tiny-llama")
    fresh = split_model(copy.deepcopy(model), 1, 1)  # no prefixes yet: loading adds them, frozen

    assert load_part_prefixes([fresh.head, fresh.tail], tmp_path / "mine") == P

    for name in ("head", "tail"):
        ours, theirs = getattr(trained, name).state_dict(), getattr(fresh, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    trainable = [name for name, p in fresh.head.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("prefix_tuning.") for name in trainable)
    lacking = r"blocks \[0, 5\]; the trunk needs blocks \[1, 2, 3, 4\] \(missing \[1, 2, 3, 4\]\)"
    with pytest.raises(PrefixError, match=lacking):
        load_part_prefixes([fresh.trunk], tmp_path / "mine")
    assert part_prefix(fresh.trunk) is None  # refused before touching it
    wider = split_model(copy.deepcopy(model), 1, 1)
    add_part_prefixes(wider, P + 1)
    with pytest.raises(PrefixError, match=f"{P} virtual tokens; the head has {P + 1}"):
        load_part_prefixes([wider.head], tmp_path / "mine")


def test_absolute_position_models_are_refused(tiny_models):
    parts = split_model(copy.deepcopy(tiny_models["tiny-gpt2"][0]), 1, 1)

    with pytest.raises(PrefixError, match="rotary"):
        add_part_prefixes(parts, P)


def test_method_config_validates():
    assert MethodConfig().prefix_tokens == 0
    assert MethodConfig(name="prefix", num_virtual_tokens=4).prefix_tokens == 4
    with pytest.raises(ValueError, match="method.name"):
        MethodConfig(name="adapter")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        MethodConfig(name="prefix", num_virtual_tokens=0)
    assert MethodConfig().init_std == PREFIX_INIT_STD
    for bad in (-0.1, float("nan"), float("inf"), "0.02", True):
        with pytest.raises(ValueError, match="method.init_std: expected a finite number >= 0"):
            MethodConfig(name="prefix", init_std=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("init_std", [PREFIX_INIT_STD, 1.0])
def test_prefixes_start_from_normal_draws_of_the_given_scale_seeded_per_part(tiny_models, init_std):
    model = tiny_models["tiny-llama"][0]
    parts = split_model(copy.deepcopy(model), 1, 1)
    again = split_model(copy.deepcopy(model), 1, 1)

    add_part_prefixes(parts, P, seed=5, init_std=init_std)
    add_part_prefixes(again, P, seed=5, init_std=init_std)

    table = peft_prefix_table(parts)
    assert torch.equal(table, peft_prefix_table(again))
    assert abs(table.std().item() / init_std - 1.0) < 0.1 and abs(table.mean().item()) < 0.1 * init_std
    head, trunk = part_prefix(parts.head), part_prefix(parts.trunk)
    assert head is not None and trunk is not None
    assert not torch.equal(head.key["0"][:, :, :4], trunk.key["1"][:, :, :4])  # seed + i: parts differ


# -- training through the split (client and trunk server joined by the serializing channel) -------------
def _local(model, steps: int, tokens: int = P):
    from fedsplit.recipes.local import local_split
    from fedsplit.train.config import TrainConfig

    cfg = TrainConfig(lr=1e-2, max_grad_norm=1.0, warmup_steps=1, schedule="cosine")
    return cfg, local_split(model, cfg, steps, head_layers=1, tail_layers=1, prefix_tokens=tokens, seed=3)


def test_prefix_training_split_equals_centralized_peft(tiny_models):
    from fedsplit.train.centralized import CentralizedTrainer

    steps = 4
    base = tiny_models["tiny-llama"][0]
    cfg, local = _local(copy.deepcopy(base).float(), steps)
    peft_model = _peft(copy.deepcopy(base).float())
    with torch.no_grad():
        _table(peft_model).copy_(peft_prefix_table(local.parts))
    start = peft_prefix_table(local.parts)
    trainer = CentralizedTrainer(peft_model, [_table(peft_model)], cfg, steps)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            batch = _batch(base, "right" if step % 2 == 0 else "left", seed=step)
            split_loss = local.client.train_step([batch]).loss
            central_loss = trainer.train_step([batch]).loss
            assert split_loss == pytest.approx(central_loss, abs=1e-5)

    trained = peft_prefix_table(local.parts)
    assert (trained - start).abs().max().item() > 1e-3  # every part's prefixes moved
    assert (trained - _table(peft_model).detach()).abs().max().item() <= 1e-5


def test_trunk_prefixes_never_leave_the_server(tiny_models):
    from fedsplit.client.runner import client_adapters
    from fedsplit.protocol import fedsplit_pb2 as pb

    model = copy.deepcopy(tiny_models["tiny-llama"][0]).float()
    _, local = _local(model, 2)
    trunk = part_prefix(local.parts.trunk)
    assert trunk is not None
    session = local.channel.transport.session
    frames: list[bytes] = []
    requests: list[tuple[int, object]] = []
    handler = session.handler

    def record(kind, rnd, step, msg):
        requests.append((kind, msg))
        return handler(kind, rnd, step, msg)

    exchange = local.channel.transport.exchange

    def exchange_recorded(frame: bytes) -> bytes:
        reply = exchange(frame)
        frames.extend([frame, reply])
        return reply

    session.handler = record
    local.channel.transport.exchange = exchange_recorded  # type: ignore[method-assign]
    before = {name: p.detach().clone() for name, p in trunk.named_parameters()}
    batch = _batch(model, "left")
    for _ in range(2):
        local.client.train_step([batch])

    hidden = model.config.hidden_size
    forwards = [msg for kind, msg in requests if kind == pb.FORWARD]
    assert forwards
    for msg in forwards:
        assert isinstance(msg, pb.Forward)
        assert [f.name for f, _ in msg.ListFields()] in (["hidden", "attention_mask", "position_ids", "train"],
                                                         ["hidden", "attention_mask", "position_ids"])
        assert list(msg.hidden.shape) == [*batch["input_ids"].shape, hidden]
    for name, param in trunk.named_parameters():
        assert not torch.equal(param.detach(), before[name])  # the trunk trained its prefixes ...
        for value in (before[name], param.detach()):
            row = value[0, 0].numpy().tobytes()  # one prefix vector, 4 * head_dim bytes
            assert not any(row in frame for frame in frames)  # ... and no frame carried one of them
    payload = client_adapters(local.parts.head, local.parts.tail)
    assert payload and all(".prefix_tuning." in key for key in payload)
    last = model.config.num_hidden_layers - 1
    assert {key.rsplit(".", 1)[1] for key in payload} == {"0", str(last)}  # head and tail blocks only


def test_federated_prefix_training_averages_client_prefixes(tiny_models, monkeypatch):
    from fedsplit.client.runner import client_adapters
    from fedsplit.recipes import inprocess
    from fedsplit.train.config import TrainConfig

    model = copy.deepcopy(tiny_models["tiny-llama"][0]).float()
    cfg = TrainConfig(lr=1e-2, batch_size=3, max_length=10, seed=0)
    silos = [[_batch(model, "right", seed=k)] for k in range(2)]
    seen = []
    aggregate = inprocess.FedAvg.aggregate

    def spy(self, round, results, failures, current):
        seen.append([update.tensors for update in results])
        return aggregate(self, round, results, failures, current)

    monkeypatch.setattr(inprocess.FedAvg, "aggregate", spy)
    init = split_model(copy.deepcopy(model), 1, 1)
    add_part_prefixes(init, P, seed=cfg.seed)

    parts, losses = inprocess.train_federated(model, silos, cfg, [], rounds=1, local_steps=1, progress=False,
                                              prefix_tokens=P)

    assert len(losses) == 2
    final = client_adapters(parts.head, parts.tail)
    start = client_adapters(init.head, init.tail)
    last = model.config.num_hidden_layers - 1
    assert final and set(final) == set(start) == {f"{side}/base_model.model.prefix_tuning.{kind}.{layer}"
                                                  for side, layer in (("head", 0), ("tail", last))
                                                  for kind in ("key", "value")}
    (first, second), = seen  # one round, two clients with equal example counts
    for key in final:
        assert not torch.equal(first[key], second[key])  # the clients trained their own prefixes
        torch.testing.assert_close(final[key], (first[key] + second[key]) / 2, rtol=0, atol=1e-6)


def test_bytes_per_step_formulas():
    from fedsplit.split.prefix import cut_bytes_per_step, flglm_prefix_bytes_per_step

    assert cut_bytes_per_step(4, 128, 576) == 4 * 4 * 128 * 576 * 4  # SmolLM2, fp32: 4,718,592
    # ChatGLM-6B (32 heads x 128, no GQA), P = 128, fp16, 27 server layers: FL-GLM's ~113 MB
    assert flglm_prefix_bytes_per_step(27, 128, 32, 128, bytes_per_value=2) == 113_246_208


def test_saved_prefix_adapter_loads_into_the_unsplit_model_with_peft(tiny_models, tmp_path):
    from peft import PeftModel

    from fedsplit.split.prefix import save_prefix_adapter

    base = tiny_models["tiny-qwen2"][0]
    parts = split_model(copy.deepcopy(base).float(), 2, 1)
    add_part_prefixes(parts, P, seed=7, init_std=1.0)
    batch = _batch(base, "left")
    mask, positions = batch["attention_mask"], positions_from_mask(batch["attention_mask"])
    with torch.no_grad():
        split = parts.tail(parts.trunk(parts.head(batch["input_ids"], mask, positions), mask, positions),
                           mask, positions)

    save_prefix_adapter(parts, tmp_path / "prefix")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base).float(), str(tmp_path / "prefix"))
        with torch.no_grad():
            unsplit = loaded(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits

    assert (split - unsplit)[mask.bool()].abs().max().item() <= 1e-5

