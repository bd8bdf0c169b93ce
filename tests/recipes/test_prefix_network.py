"""P-tuning v2 over the network (fedsplit.recipes.prefix_network): the real ``run_server`` and two
``run_client`` threads over loopback gRPC on tiny-llama, and the handshake refusing a LoRA client."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from google.protobuf.message import Message

from fedsplit.config import (
    ClientConfig,
    DataConfig,
    EvalConfig,
    FederationConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    SecurityConfig,
    ServerConfig,
    run_config_hash,
    run_config_sections,
)
from fedsplit.protocol import ProtocolError, decode_named, pb
from fedsplit.recipes import network
from fedsplit.split.prefix import part_prefix
from fedsplit.train.config import TrainConfig

from tiny import run_federation_in_threads

P = 3


def prefix_config(port: int) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name="tiny-llama", head_layers=1, tail_layers=1),
        train=TrainConfig(lr=1e-2, batch_size=2, max_length=24, warmup_steps=0),
        data=DataConfig(num_clients=2, max_train_examples=24, max_eval_examples=4),
        federation=FederationConfig(rounds=2, local_steps=2),
        eval=EvalConfig(federated=False, rouge_examples=0),
        server=ServerConfig(address=f"127.0.0.1:{port}", threads=1, join_grace_s=2.0, join_timeout_s=60.0),
        security=SecurityConfig(insecure=True, run_id="prefix-run"),
        client=ClientConfig(threads=1),
        method=MethodConfig(name="prefix", num_virtual_tokens=P),
    )


def test_build_parts_puts_prefixes_on_the_parts_each_role_trains_and_generation_builds_all_three():
    cfg = prefix_config(0)

    _, server = network.build_parts(cfg, role="server")
    _, client = network.build_parts(cfg, role="client")

    assert all(part_prefix(part) is not None for part in server)  # trunk trains, head/tail: the global FedAvg copy
    assert part_prefix(client.head) is not None and part_prefix(client.tail) is not None
    assert part_prefix(client.trunk) is None
    trainable = [name for name, p in server.trunk.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("prefix_tuning.") for name in trainable)
    for name in ("head", "tail"):  # same seed per part: the server's global prefixes start where the clients' do
        ours, theirs = getattr(server, name).state_dict(), getattr(client, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours if k.startswith("prefix_tuning."))
    _, whole = network.build_parts(cfg)  # no role: split generation (fedsplit generate) loads the run's prefixes
    for name in ("head", "tail"):
        ours, theirs = getattr(whole, name).state_dict(), getattr(client, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours if k.startswith("prefix_tuning."))
    assert all(torch.equal(v, server.trunk.state_dict()[k]) for k, v in whole.trunk.state_dict().items()
               if k.startswith("prefix_tuning."))


def test_the_server_warns_of_a_lora_sized_learning_rate_for_prefixes(caplog):
    import logging

    cfg = prefix_config(0)  # train.lr = 1e-2

    with caplog.at_level(logging.WARNING, logger="fedsplit.recipes.prefix_network"):
        network.build_parts(cfg, role="server")
        assert not caplog.records
        network.build_parts(replace(cfg, train=replace(cfg.train, lr=2e-4)), role="server")
        network.build_parts(replace(cfg, train=replace(cfg.train, lr=2e-4)), role="client")  # the server warns

    assert [r.getMessage() for r in caplog.records] == [
        "method.name = 'prefix' with train.lr = 0.0002: P-tuning v2 prefixes need a larger step than LoRA "
        "weights (docs/ptuning.md measures 1e-2); at this rate they barely move"]


def test_a_prefix_federation_over_grpc_averages_head_and_tail_prefixes_and_trains_the_trunk_ones(
        tmp_path, monkeypatch):
    # Arrange: the real server and two client threads; every CLIENT_UPDATE is recorded as it arrives
    from fedsplit.server.coordinator import RoundCoordinator

    cfg = prefix_config(network.free_port())
    server_toml, _ = network.write_federation(cfg, tmp_path)
    keys = (tmp_path / "keys").resolve()  # write_federation's keys: the server's, a CA and one per client
    cfg = replace(cfg, security=replace(cfg.security, keys_dir=str(keys), clients=["client-0", "client-1"]))
    updates: dict[tuple[int, str], tuple[dict[str, torch.Tensor], int]] = {}
    handler_for = RoundCoordinator.handler_for

    def recording(self, client_id):
        handle = handler_for(self, client_id)

        def wrapped(kind: int, rnd: int, step: int, request: Message) -> Message:
            reply = handle(kind, rnd, step, request)
            if kind == pb.CLIENT_UPDATE:
                updates[(request.round, client_id)] = (decode_named(request.adapters, "update"),
                                                      int(request.num_examples))
            return reply

        return wrapped

    monkeypatch.setattr(RoundCoordinator, "handler_for", recording)

    # Act
    code, errors = run_federation_in_threads(cfg, server_toml.parent, tmp_path)

    # Assert: the run completed; the saved adapter is PEFT's one prefix table of all blocks
    assert code == 0 and not errors
    from safetensors.torch import load_file

    table = load_file(str(tmp_path / "server" / "adapters" / "prefix" / "adapter_model.safetensors"))
    table = table["prompt_embeddings"]  # (P, N * 2 * kv_heads * head_dim)
    _, initial = network.build_parts(cfg, role="server")
    layers = initial.tail.layer_indices[-1] + 1
    grid = table.view(P, layers * 2, -1)  # (P, 2N, kv_heads * head_dim)
    final = {(layer, which): grid[:, 2 * layer + i]
             for layer in range(layers) for i, which in enumerate(("key", "value"))}

    # the last round's global head/tail prefixes are the example-weighted mean of the two uploads
    last = {cid: value for (rnd, cid), value in updates.items() if rnd == cfg.federation.rounds}
    assert sorted(last) == ["client-0", "client-1"]
    total = sum(n for _, n in last.values())
    for (layer, which), saved in final.items():
        part = "head" if layer in initial.head.layer_indices else "tail"
        key = f"{part}/base_model.model.prefix_tuning.{which}.{layer}"
        if layer in initial.trunk.layer_indices:  # trunk prefixes never travel; they trained on the server
            assert all(f"prefix_tuning.{which}.{layer}" not in k for tensors, _ in last.values() for k in tensors)
            start = getattr(part_prefix(initial.trunk), which)[str(layer)].detach()
            assert not torch.allclose(saved, start.permute(1, 0, 2).flatten(1))
            continue
        mean = sum(tensors[key].double() * n for tensors, n in last.values()) / total  # (kv_heads, P, head_dim)
        assert torch.allclose(saved.double(), mean.permute(1, 0, 2).flatten(1), atol=1e-6)
        assert not torch.equal(last["client-0"][0][key], last["client-1"][0][key])  # a real mean of two

    # each client kept its copy of the final global head/tail prefixes (fedsplit generate --run <client out>)
    from fedsplit.split.prefix import load_part_prefixes

    for client in ("client-0", "client-1"):
        _, fresh_parts = network.build_parts(cfg, role="client")
        assert load_part_prefixes([fresh_parts.head, fresh_parts.tail],
                                  tmp_path / client / "adapters" / network.CLIENT_PREFIX) == P
        for part in (fresh_parts.head, fresh_parts.tail):
            for layer in part.layer_indices:
                for which in ("key", "value"):
                    mine = getattr(part_prefix(part), which)[str(layer)].detach()
                    assert torch.equal(mine.permute(1, 0, 2).flatten(1), final[(layer, which)])

    # the last round's checkpoint holds the trained trunk prefixes; restoring it into a fresh trunk server
    # (--resume) gives them back
    from fedsplit.server.checkpoint import latest_checkpoint, load_checkpoint, restore_trunk

    found = latest_checkpoint(tmp_path / "server" / "checkpoints")
    assert found is not None
    checkpoint = load_checkpoint(found)
    assert checkpoint.round == cfg.federation.rounds
    trunk_keys = {f"base_model.model.prefix_tuning.{which}.{layer}" for layer in initial.trunk.layer_indices
                  for which in ("key", "value")}
    assert set(checkpoint.trunk.adapters) == trunk_keys and checkpoint.trunk.optimizer["state"]
    fresh = network.make_trunk_server(cfg, initial)
    restore_trunk(fresh, checkpoint.trunk)
    restored = part_prefix(fresh.trunk)
    assert restored is not None
    for layer in initial.trunk.layer_indices:
        for which in ("key", "value"):
            value = getattr(restored, which)[str(layer)].detach().permute(1, 0, 2).flatten(1)
            assert torch.equal(value, final[(layer, which)])
    assert fresh.optimizer.state_dict()["state"]  # the AdamW moments of the prefixes came back too


def test_a_lora_client_is_refused_by_a_prefix_server_naming_the_method_section(tmp_path, tokenizer):
    from fedsplit.client.runner import Backoff, ClientRunner, RunAbortedError
    from fedsplit.recipes.keygen import run_keygen
    from fedsplit.security.handshake import HandshakeVerifier
    from fedsplit.security.identity import load_private_key, load_public_key
    from fedsplit.transport.grpc_server import GrpcServer
    from fedsplit.transport.handshake import ClientCredentials, SessionFactory

    # Arrange: a server agreeing on prefix tuning, a client configured for LoRA (all else equal)
    ours = prefix_config(0)
    theirs = replace(ours, method=MethodConfig(name="lora"))
    run_keygen(tmp_path, "server")
    run_keygen(tmp_path, "alice")
    verifier = HandshakeVerifier(
        load_private_key(tmp_path / "server.key"), {"alice": load_public_key(tmp_path / "alice.pub")}, [],
        pb.PROTOCOL_VERSION_CURRENT, run_config_hash(ours, tokenizer), run_id="prefix-run",
        config_sections=run_config_sections(ours, tokenizer))

    def refuse(*_: object) -> Message:
        raise ProtocolError("not served", code=pb.FAILED_PRECONDITION)

    server = GrpcServer("127.0.0.1:0", SessionFactory(verifier, lambda cid: refuse, "prefix-run"),
                        insecure=True).start()
    credentials = ClientCredentials(
        identity=load_private_key(tmp_path / "alice.key"), server_key=load_public_key(tmp_path / "server.pub"),
        client_id="alice", run_id="prefix-run", config_hash=run_config_hash(theirs, tokenizer),
        config_sections=run_config_sections(theirs, tokenizer))
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}  # never trained on: the run ends at the handshake
    runner = ClientRunner("alice", None, None, [batch], theirs.train,  # type: ignore[arg-type]
                          lambda: network.dial(f"127.0.0.1:{server.port}", credentials, connect_timeout_s=5.0),
                          backoff=Backoff(base_s=0.01, max_s=0.02, max_attempts=3))
    try:
        # Act
        with pytest.raises(RunAbortedError) as info:
            runner.run()
    finally:
        server.stop(0)

    # Assert
    message = str(info.value)
    assert "sections that differ: method" in message and "Retrying cannot fix this" in message


@pytest.fixture(scope="module")
def tokenizer():
    from fedsplit.models import load_model

    return load_model("tiny-llama")[1]


def test_simulate_scores_a_prefix_run_with_its_peft_prefix_adapter(tmp_path, monkeypatch, capsys):
    # Arrange: the federation's processes replaced by a server directory holding what a prefix run saves
    from fedsplit.models import load_model
    from fedsplit.recipes import simulate as simulate_recipe
    from fedsplit.recipes.prefix_network import save_final_prefix
    from fedsplit.split import split_model
    from fedsplit.split.prefix import add_part_prefixes

    cfg = prefix_config(0)
    cfg = replace(cfg, data=replace(cfg.data, max_eval_examples=2), eval=replace(cfg.eval, rouge_examples=0))
    model, _ = load_model("tiny-llama")
    parts = split_model(model, 1, 1)
    add_part_prefixes(parts, P, seed=2)
    server_dir = tmp_path / "server"
    save_final_prefix(parts, server_dir / "adapters", "tiny-llama")
    server_dir.joinpath("metrics.jsonl").write_text("")
    monkeypatch.setattr(simulate_recipe, "simulate", lambda cfg, out: server_dir)

    # Act
    code = simulate_recipe.run_simulate(cfg, tmp_path)

    # Assert
    printed = capsys.readouterr().out
    assert code == 0 and "federation complete" in printed and "federated split (final)" in printed
