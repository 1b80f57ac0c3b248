"""Training configuration: presets, overrides, files, validation errors."""

from __future__ import annotations

import json

import pytest

from megatron_lopd.errors import ConfigError
from megatron_lopd.training.config import (
    TrainConfig,
    apply_overrides,
    lightning_opd_defaults,
    load_file,
    named_config,
    resolve_config,
    sft_defaults,
    tiny_cpu,
)

REQUIRED = ["model.start_from=/ckpt", "data.store=/store"]


def test_paper_presets():
    opd = lightning_opd_defaults()
    assert (opd.loss, opd.optimizer.lr, opd.schedule.kind) == ("lightning_opd", 2e-6, "constant")
    assert (opd.optimizer.adam_beta1, opd.optimizer.adam_beta2, opd.optimizer.weight_decay) == (0.9, 0.98, 0.1)
    assert (opd.data.global_batch, opd.train_steps) == (256, 150)
    sft = sft_defaults()
    assert (sft.loss, sft.optimizer.lr, sft.schedule.kind, sft.schedule.warmup_fraction, sft.train_steps) == (
        "sft", 8e-5, "cosine", 0.1, 3000)
    assert sft.data.seq_length == 16384
    assert tiny_cpu().model.precision == "fp32"


def test_overrides_convert_types_and_leave_the_input_alone():
    base = named_config("lightning_opd")
    cfg = apply_overrides(base, REQUIRED + [
        "optimizer.lr=1e-5", "data.global_batch=1e3", "data.pack=false", "parallel.tensor_parallel=4",
        "logging.wandb_project=lopd", "loss=sft", "data.sft_data=/sft", "epochs=2.5",
    ])
    assert cfg.optimizer.lr == 1e-5 and isinstance(cfg.optimizer.lr, float)
    assert cfg.data.global_batch == 1000 and isinstance(cfg.data.global_batch, int)
    assert cfg.data.pack is False and cfg.parallel.tensor_parallel == 4
    assert (cfg.logging.wandb_project, cfg.loss, cfg.epochs) == ("lopd", "sft", 2.5)
    assert base.optimizer.lr == 2e-6 and base.data.pack is True  # not mutated
    cfg.validate()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lrr=1", "did you mean lr"),
        ("nope=1", "unknown config key 'nope'"),
        ("data.global_batch=1.5", "not an integer"),
        ("data.pack=maybe", "not a boolean"),
        ("optimizer=3", "is a section"),
        ("loss.x=1", "is a value, not a section"),
        ("optimizer.lr", "not key=value"),
        ("optimizer.lr=abc", "not a number"),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss=opd"], "loss='opd' is not one of"),
        (["model.fp8=hybrid"], "model.fp8='hybrid'"),
        (["schedule.kind=linear"], "schedule.kind"),
        (["data.global_batch=0"], "data.global_batch=0 must be positive"),
        (["parallel.tensor_parallel=0"], "parallel.tensor_parallel=0 must be positive"),
        (["model.named=tiny"], "exactly one of model.start_from"),
        (["data.store="], "reads data.store"),
        (["loss=sft"], "reads data.sft_data"),
        (["parallel.sequence_parallel=true"], "sequence_parallel needs tensor_parallel > 1"),
        (["train_steps=0"], "train_steps and epochs are both 0"),
        (["schedule.warmup_fraction=1.0"], "warmup_fraction"),
        (["loss_reduction=batch_mean"], "loss_reduction='batch_mean' is not one of"),
        (["advantage_clip=-1"], "advantage_clip=-1.0 with loss 'lightning_opd'"),
        (["loss=topk_reverse_kl", "advantage_clip=1"], "for loss=lightning_opd only"),
        (["optimizer.cpu_offload=true", "parallel.use_distributed_optimizer=false"], "optimizer.cpu_offload needs the distributed optimizer"),
        (["optimizer.cpu_offload=true", "optimizer.cpu_offload_fraction=0"], r"cpu_offload_fraction=0.0 is outside \(0, 1\]"),
        (["optimizer.precision_aware=true", "parallel.use_distributed_optimizer=false"], "precision_aware needs the distributed optimizer"),
        (["data.micro_batch_tokens=4096", "parallel.pipeline_parallel=2"], "micro_batch_tokens .* needs data.pack=true and pipeline_parallel=1"),
        (["data.micro_batch_tokens=-1"], "micro_batch_tokens=-1 is negative"),
        (["model.export_dtype=fp8"], "model.export_dtype='fp8' is not one of"),
    ],
)
def test_validation_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(lightning_opd_defaults(), REQUIRED + overrides).validate()


def test_config_files_json_yaml_toml(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"base": "sft", "optimizer": {"lr": 3e-5}, "data": {"sft_data": "/d"}}))
    (tmp_path / "c.yaml").write_text("base: tiny_cpu\nloss: sft\ndata:\n  sft_data: /d\n  global_batch: 4\n")
    (tmp_path / "c.toml").write_text('train_steps = 7\n[model]\nstart_from = "/m"\n[data]\nstore = "/s"\n')
    j = load_file(tmp_path / "c.json")
    assert (j.loss, j.optimizer.lr, j.schedule.kind, j.data.sft_data) == ("sft", 3e-5, "cosine", "/d")
    y = load_file(tmp_path / "c.yaml")
    assert (y.loss, y.data.global_batch, y.data.seq_length, y.model.precision) == ("sft", 4, 128, "fp32")
    t = resolve_config(str(tmp_path / "c.toml"), ["data.seed=3"])
    assert (t.train_steps, t.model.start_from, t.data.store, t.data.seed) == (7, "/m", "/s", 3)
    assert t.loss == "lightning_opd"  # defaults kept for keys the file leaves out


def test_config_file_errors(tmp_path):
    (tmp_path / "bad.json").write_text('{"optimizer": {"lrate": 1}}')
    with pytest.raises(ConfigError, match=r"bad.json: unknown config key 'optimizer.lrate'"):
        load_file(tmp_path / "bad.json")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_file(tmp_path / "broken.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_file(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown config 'paper'.*lightning_opd"):
        resolve_config("paper")


def test_loss_options_come_from_the_config():
    from megatron_lopd.training.config import LOSS_REDUCTIONS
    from megatron_lopd.training.losses import REDUCTIONS

    assert LOSS_REDUCTIONS == REDUCTIONS
    config = apply_overrides(lightning_opd_defaults(), REQUIRED + ["advantage_clip=2", "loss_reduction=token_mean"])
    assert config.validate().advantage_clip == 2.0 and config.loss_reduction == "token_mean"
