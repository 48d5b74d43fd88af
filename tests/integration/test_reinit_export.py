"""Drop-Upcycling through the transform job (`upcycling transform`, as the DAG runs it): with
r = 0.5 the Mixtral export loads in transformers, and its loss on a batch is the loss the
project's own model computes for the init; re-drawn units start with zero Adam moments."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_sweep import run_cli  # noqa: E402
from upcycling.model.export import load_adam_moments, load_hf, save_hf  # noqa: E402
from upcycling.model.flops import ModelConfig  # noqa: E402
from upcycling.model.transformer import MoEOptions, Transformer, expert_weight_name  # noqa: E402
from upcycling.transform.methods import Stage2Options  # noqa: E402

DENSE = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, seq_len=16)


def _transform(tmp_path, out: str, ratio: float) -> None:
    spec = {
        "method": "moe_upcycle",
        "options": Stage2Options(experts=4, top_k=2, granularity=2, reinit_ratio=ratio).to_dict(),
        "dense": str(tmp_path / "dense"),
        "out": str(tmp_path / out),
        "seed": 3,
        "copy_optimizer_state": True,
    }
    run_cli(["transform", "--spec", json.dumps(spec)], cwd=tmp_path)


@pytest.mark.slow  # two transform CLI runs and transformers
def test_a_reinitialised_export_loads_in_transformers_with_the_projects_loss(tmp_path):
    torch.manual_seed(0)
    dense = Transformer(DENSE).eval()
    state = dense.state_dict()
    moments = (
        {name: torch.randn_like(t) for name, t in state.items()},
        {n: torch.rand_like(t) for n, t in state.items()},
    )
    save_hf(state, DENSE, tmp_path / "dense", adam_moments=(*moments, 10))
    _transform(tmp_path, "plain", 0.0)
    _transform(tmp_path, "dropped", 0.5)

    plain, _, plain_raw = load_hf(tmp_path / "plain")
    weights, cfg, raw = load_hf(tmp_path / "dropped")
    assert raw["upcycling"]["reinit_ratio"] == 0.5 and "reinit_ratio" not in plain_raw["upcycling"]
    ours = Transformer(cfg, MoEOptions(drop_tokens=False)).eval()
    ours.load_state_dict(weights, strict=True)
    theirs = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "dropped").eval()

    tokens = torch.randint(0, DENSE.vocab_size, (4, DENSE.seq_len + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        _, our_loss, _ = ours(inputs, targets)
        logits = theirs(inputs).logits
        their_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        _, dense_loss, _ = dense(inputs, targets)
    torch.testing.assert_close(their_loss, our_loss, rtol=1e-5, atol=1e-5)
    # Half of every expert's units re-drawn: the init is no longer the dense function (r = 0 is).
    assert abs(float(our_loss) - float(dense_loss)) > 1e-4

    # Re-drawn units (where the weights left the plain copy) have zero moments; the rest are copied.
    exp_avg, exp_avg_sq, step = load_adam_moments(tmp_path / "dropped")
    plain_avg, _, _ = load_adam_moments(tmp_path / "plain")
    assert step == 10
    for layer in range(DENSE.n_layers):
        for expert in range(4):
            name = expert_weight_name(layer, expert, "gate_up.weight")
            redrawn = (weights[name] != plain[name]).all(dim=1)
            assert int(redrawn.sum()) == 2 * 16  # gate and up rows of round(0.5 x 32) units
            assert not exp_avg[name][redrawn].any() and not exp_avg_sq[name][redrawn].any()
            assert torch.equal(exp_avg[name][~redrawn], plain_avg[name][~redrawn])
