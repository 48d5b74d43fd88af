"""Config validation: every bad config fails before any work, with a message naming the key; the
typed sweep holds the schema's defaults; the default config builds the Snakemake DAG."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from tiny_sweep import REPO
from upcycling.sweep.load import ConfigError, load_sweep, sweep_from_mapping

DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _check(mutate) -> None:
    cfg = copy.deepcopy(DEFAULT)
    cfg["results_dir"] = "/nonexistent/upcycling-test-results"  # never the checkout's results/
    mutate(cfg)
    sweep_from_mapping(cfg, REPO)


def test_default_config_is_valid_and_gets_defaults():
    sweep = load_sweep(REPO / "config" / "config.yaml", base_dir=REPO)
    assert sweep.sweep.granularity == (1,) and sweep.training.zero_stage == 0  # schema defaults
    assert sweep.dense_models["xs"].rope_theta == 10000.0 and sweep.moe.ep_size == 1
    assert sweep.scratch_d_tokens == tuple(DEFAULT["baselines"]["scratch_d_tokens"])
    # Frozen all the way down: a job cannot change the sweep another job reads.
    with pytest.raises(dataclasses.FrozenInstanceError):
        sweep.training.lr = 1.0
    with pytest.raises(TypeError):
        sweep.dense_models["xs"] = None
    # The mapping it was built from is left alone (defaults are filled into a copy).
    assert sweep.training.compile is False and "compile" not in DEFAULT["training"]


def _set(path: str, value):
    def mutate(cfg):
        *parents, leaf = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        node[leaf] = value

    return mutate


def _delete(path: str):
    def mutate(cfg):
        *parents, leaf = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        del node[leaf]

    return mutate


BAD_CONFIGS = [
    ("d1 not increasing", _set("sweep.d1_tokens", [262144, 131072]), "sweep.d1_tokens", "strictly increasing"),
    ("d2 duplicate", _set("sweep.d2_tokens", [131072, 131072]), "sweep.d2_tokens", "strictly increasing"),
    ("negative D", _set("sweep.d2_tokens", [-5, 10]), "sweep.d2_tokens.0", "less than or equal to the minimum"),
    ("k > E", _set("sweep.top_k", [8]), "sweep.top_k", "k <= E"),
    ("heads do not divide d_model", _set("dense_models.xs.n_heads", 5), "dense_models.xs.n_heads", "divide"),
    ("odd head size", _set("dense_models.xs.n_heads", 64), "dense_models.xs.n_heads", "even head size"),
    ("D beyond the corpus", _set("sweep.d2_tokens", [65536, 10**9]), "sweep.d2_tokens", "exceed what the corpus"),
    ("missing corpus", _set("corpus.paths", ["data/nothing/*.txt"]), "corpus.paths", "matches no file"),
    ("granularity vs ffn", _set("sweep.granularity", [3]), "sweep.granularity", "does not divide"),
    (
        "E not multiple of G",
        lambda cfg: cfg["sweep"].update(experts=[5], granularity=[2]),
        "sweep.experts",
        "not a multiple of granularity",
    ),
    ("ep_size vs E", _set("moe.ep_size", 3), "moe.ep_size", "does not divide"),
    ("unknown key", _set("training.learning_rate", 1e-3), "training", "misspelt"),
    ("missing section", _delete("sweep"), "<top level>", "'sweep' is a required property"),
    ("bad schedule", _set("training.schedule", "linear"), "training.schedule", "is not one of"),
    ("warmup too long", _set("training.warmup_tokens", 10**6), "training.warmup_tokens", "lower warmup_tokens"),
    ("zero-3", _set("training.zero_stage", 3), "training.zero_stage", None),
    ("missing tokenizer file", _set("tokenizer.path", "no/such/tokenizer.json"), "tokenizer.path", "does not exist"),
    (
        "throughput missing a size",
        _set("slurm.throughput_tokens_per_s", {"xs": 1.0}),
        "slurm.throughput_tokens_per_s",
        "no throughput for dense model",
    ),
    ("repeated seeds", _set("training.seeds", [0, 0]), "training.seeds", "repeat"),
    ("val_fraction", _set("corpus.val_fraction", 0.9), "corpus.val_fraction", None),
    (
        "model_config D1 not trained",
        _set("sweep.model_config.d1_tokens", 12345),
        "sweep.model_config.d1_tokens",
        "not one of sweep.d1_tokens",
    ),
    ("model_config k > E", _set("sweep.model_config.top_k", [4]), "sweep.model_config.top_k", "k <= E"),
]


@pytest.mark.parametrize("name,mutate,key,phrase", BAD_CONFIGS, ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_names_the_key(name, mutate, key, phrase):
    with pytest.raises(ConfigError) as error:
        _check(mutate)
    message = str(error.value)
    assert f"'{key}" in message, message
    if phrase:
        assert phrase in message, message


def test_k_not_multiple_of_granularity_is_refused():
    def mutate(cfg):
        cfg["sweep"]["granularity"] = [2]
        cfg["sweep"]["experts"] = [4]
        cfg["sweep"]["top_k"] = [1]

    with pytest.raises(ConfigError, match="'sweep.top_k'.*multiple of granularity"):
        _check(mutate)


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(bad)


@pytest.mark.parametrize(
    "moe,dispatch",
    [({}, "grouped"), ({"drop_tokens": True}, "gshard"), ({"dispatch": "gshard"}, "gshard")],
)
def test_the_moe_dispatch_is_written_out_in_every_moe_jobs_spec(moe, dispatch):
    """Unset, moe.dispatch means grouped without token dropping and GShard with it; the sweep (and
    so each MoE job's spec, hence its rerun trigger) names the one that runs."""
    cfg = copy.deepcopy(DEFAULT)
    cfg["moe"] = moe
    assert sweep_from_mapping(cfg, REPO, check_corpus=False).moe.dispatch == dispatch


def test_grouped_dispatch_with_token_dropping_is_refused():
    cfg = copy.deepcopy(DEFAULT)
    cfg["moe"] = {"dispatch": "grouped", "drop_tokens": True}
    with pytest.raises(ConfigError, match="moe.dispatch.*moe.drop_tokens: false"):
        sweep_from_mapping(cfg, REPO, check_corpus=False)
