"""moe.dispatch grouped and gshard on the real DeepSpeed engine: the same training losses, checkpoints
that resume across the two, the same Mixtral export, function-preserving upcycling at step 0, and
expert parallelism over two gloo processes equal to one process holding every expert."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import cli_env  # noqa: E402
from upcycling.model.export import load_hf, save_hf  # noqa: E402
from upcycling.model.flops import ModelConfig  # noqa: E402
from upcycling.model.transformer import MoEOptions, Transformer  # noqa: E402
from upcycling.train import distributed  # noqa: E402
from upcycling.train.loop import build_engine  # noqa: E402
from upcycling.transform.upcycle import upcycle_state  # noqa: E402

DENSE = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, seq_len=8)
MOE = ModelConfig(**{**DENSE.__dict__, "experts": 4, "top_k": 2})
TRAINING = {
    "micro_batch_size": 2,
    "grad_accum_steps": 1,
    "grad_clip": 1.0,
    "zero_stage": 0,
    "precision": "fp32",
    "lr": 3e-3,
    "weight_decay": 0.1,
    "adam_betas": [0.9, 0.95],
    "compile": False,
}
DISPATCHES = ("gshard", "grouped")
STEPS = 3


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, MOE.vocab_size, (2, MOE.seq_len + 1), generator=generator) for _ in range(count)]
    return [(window[:, :-1], window[:, 1:]) for window in windows]


def _engine(dispatch: str, cfg: ModelConfig = MOE, state: dict | None = None):
    torch.manual_seed(0)
    model = Transformer(cfg, MoEOptions(dispatch=dispatch, z_loss_coef=1e-3))
    if state is not None:
        model.load_state_dict(state, strict=True)
    return build_engine(model, TRAINING, distributed.init())


def _step(engine, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    _, lm_loss, moe_loss = engine(inputs, targets)
    engine.backward(lm_loss + moe_loss)
    engine.step()
    return float(lm_loss.detach())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Per dispatch: the engine after STEPS steps, its losses, its Mixtral export and its checkpoint."""
    root = tmp_path_factory.mktemp("dispatch")
    batches = _batches(STEPS)
    runs = {}
    for dispatch in DISPATCHES:
        engine = _engine(dispatch)
        losses = [_step(engine, inputs, targets) for inputs, targets in batches]
        save_hf(engine.module.state_dict(), MOE, root / dispatch / "hf")
        engine.save_checkpoint(str(root / dispatch / "ds"), tag="step3")
        runs[dispatch] = {
            "engine": engine,
            "losses": losses,
            "hf": root / dispatch / "hf",
            "ds": root / dispatch / "ds",
        }
    return runs


def test_engine_steps_give_the_same_losses(trained):
    gshard, grouped = trained["gshard"]["losses"], trained["grouped"]["losses"]
    assert len(set(gshard)) == STEPS  # the model trains: each step's loss differs
    assert grouped == pytest.approx(gshard, rel=1e-5)


@pytest.mark.parametrize("written_by,resumed_by", [("gshard", "grouped"), ("grouped", "gshard")])
def test_checkpoint_resumes_with_the_other_dispatch(trained, written_by, resumed_by):
    inputs, targets = _batches(STEPS + 1)[-1]
    engine = _engine(resumed_by)
    engine.load_checkpoint(str(trained[written_by]["ds"]), tag="step3")
    for name, param in trained[written_by]["engine"].module.state_dict().items():
        assert torch.equal(engine.module.state_dict()[name], param), name
    resumed_loss = _step(engine, inputs, targets)
    continued_loss = _step(_resumed_copy(trained[written_by]["ds"], written_by), inputs, targets)
    assert resumed_loss == pytest.approx(continued_loss, rel=1e-5)


def _resumed_copy(checkpoint: Path, dispatch: str):
    engine = _engine(dispatch)
    engine.load_checkpoint(str(checkpoint), tag="step3")
    return engine


def test_mixtral_export_is_the_same(trained):
    exports = {dispatch: load_hf(trained[dispatch]["hf"]) for dispatch in DISPATCHES}
    (gshard_state, gshard_cfg, gshard_raw), (grouped_state, grouped_cfg, grouped_raw) = exports.values()
    assert grouped_cfg == gshard_cfg == MOE
    gshard_raw["upcycling"].pop("weights_sha256")
    grouped_raw["upcycling"].pop("weights_sha256")
    assert json.dumps(grouped_raw, sort_keys=True) == json.dumps(gshard_raw, sort_keys=True)
    assert grouped_state.keys() == gshard_state.keys()
    for name, weight in gshard_state.items():
        torch.testing.assert_close(grouped_state[name], weight, rtol=1e-4, atol=1e-6, msg=name)


def test_upcycled_init_is_function_preserving_at_step_zero():
    torch.manual_seed(3)
    dense = Transformer(DENSE)
    state, cfg = upcycle_state(dense.state_dict(), DENSE, 4, 2, 2, router_init_std=0.5)
    engine = _engine("grouped", cfg, state)
    inputs, targets = _batches(1)[0]
    engine.eval()
    with torch.no_grad():
        moe_logits, moe_loss, _ = engine(inputs, targets)
        dense_logits, dense_loss, _ = dense(inputs, targets)
    torch.testing.assert_close(moe_logits, dense_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moe_loss, dense_loss, rtol=1e-5, atol=1e-6)


# Expert parallelism: each rank checks itself against an ep_size 1 layer holding all the experts.
_EXPERT_PARALLEL_WORKER = """
import torch, torch.distributed as dist
from upcycling.model.flops import ModelConfig
from upcycling.model.transformer import MoEFeedForward, MoEOptions, join_expert_name, split_expert_name
from upcycling.train import distributed

distributed.init()
rank = dist.get_rank()
cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, ffn_hidden=32, seq_len=8, experts=4, top_k=2)
torch.manual_seed(0)
whole = MoEFeedForward(cfg, MoEOptions(dispatch="grouped"))
split = MoEFeedForward(cfg, MoEOptions(dispatch="grouped", ep_size=2))
split.moe.set_deepspeed_parallelism()
local = split.moe.num_local_experts
def global_name(name):
    parts = split_expert_name(name)
    return name if parts is None else join_expert_name(parts[0], rank * local + parts[1], parts[2])
split.load_state_dict({name: whole.state_dict()[global_name(name)] for name in split.state_dict()})

torch.manual_seed(100 + rank)  # each rank its own tokens, some routed to the other rank's experts
inputs, projection = torch.randn(3, cfg.seq_len, cfg.d_model), torch.randn(3, cfg.seq_len, cfg.d_model)
outputs = {}
for name, layer in (("whole", whole), ("split", split)):
    out = layer(inputs)
    ((out * projection).sum() + layer.aux_loss).backward()
    outputs[name] = out
torch.testing.assert_close(outputs["split"], outputs["whole"], rtol=1e-5, atol=1e-6)
assert torch.equal(split.expert_counts, whole.expert_counts)
received = whole.expert_counts.clone()
dist.all_reduce(received)
assert int(received.view(2, local)[1 - rank].sum()) > 0, "no token crossed to the other rank"
for name, param in whole.named_parameters():
    if split_expert_name(name) is not None:
        dist.all_reduce(param.grad)  # an expert learns from the tokens of every rank
for name, param in split.named_parameters():
    expected = dict(whole.named_parameters())[global_name(name)].grad
    torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-6, msg=name)
print("expert-parallel ok", rank)
"""


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.slow  # two processes under torchrun: over 10 s
def test_expert_parallel_over_two_processes_equals_one(tmp_path):
    worker = tmp_path / "expert_parallel_worker.py"
    worker.write_text(_EXPERT_PARALLEL_WORKER)
    port = _free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, str(worker)],
            env=cli_env(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for rank, process in enumerate(processes):
        output, _ = process.communicate(timeout=240)
        assert process.returncode == 0, f"rank {rank}:\n{output[-4000:]}"
        assert f"expert-parallel ok {rank}" in output
