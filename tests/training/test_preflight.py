"""`preflight` is the one list of checks before compute: the trainer (tests/training/test_loop.py
checks its errors end to end) and `lopd pipeline check-train` (`pipeline.check_training_inputs`,
before a job is queued) refuse the same inputs with the same one-line error.

Each case was once checked by only one of the two (sequence length against the context and the
store's vocabulary by the trainer; the world size by the pipeline; the run dir by neither
before queueing)."""

from __future__ import annotations

import math

import pytest

from megatron_lopd.errors import LopdError
from megatron_lopd.pipeline import check_training_inputs
from megatron_lopd.training.config import resolve_config
from megatron_lopd.training.data import OfflineData
from megatron_lopd.training.preflight import preflight
from tests.training.test_loop import bad_stores, opd_overrides, pipeline  # noqa: F401  (fixtures)


def _error(fn) -> str:
    try:
        fn()
    except LopdError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_trainer_and_check_train_refuse_the_same_inputs(pipeline, bad_stores, tmp_path):  # noqa: F811
    no_sft = {"data.sft_data": ""}
    cases = {
        "teacher_mismatch": ({**no_sft, "teacher_consistency.sft_data_generator": "model-another-teacher"},
                             "ConsistencyError: teacher inconsistency: the store was scored by model-"),
        "unknown_generator": (no_sft, "ConsistencyError: teacher consistency cannot be verified"),
        "policy_mismatch": ({"model.start_from": pipeline["teacher"]}, "ConsistencyError: policy mismatch"),
        "other_tokenizer": ({"data.store": bad_stores["other_tokenizer"]}, "ConsistencyError: tokenizer mismatch across stages"),
        "past_context": ({"data.seq_length": 1024}, "ConfigError: data.seq_length=1024 is longer than the model's context (512 positions)"),
        "ids_past_vocab": ({"data.store": bad_stores["big_ids"]}, f"ArtifactError: {bad_stores['big_ids']}: was scored with a vocabulary of 256 ids"),
        "batch_vs_world": ({"data.global_batch": 7}, "ConfigError: data.global_batch=7 is not divisible by the data-parallel size 2"),
        "corrupted": ({"data.store": bad_stores["corrupted"]}, f"ChecksumError: teacher store {bad_stores['corrupted']}: "),
        "run_dir_is_the_store": ({"run_dir": pipeline["store"]}, "ConfigError: "),
    }
    for name, (extra, prefix) in cases.items():
        overrides = opd_overrides(pipeline, extra.pop("run_dir", tmp_path / name), **extra)
        by_trainer = _error(lambda: preflight(resolve_config("tiny_cpu", overrides), OfflineData(), world_size=2))
        by_pipeline = _error(lambda: check_training_inputs("tiny_cpu", overrides, world_size=2))
        assert by_trainer.startswith(prefix), (name, by_trainer)
        # A corrupted store: the pipeline verifies every chunk, the trainer checks the files; both refuse it.
        same = by_pipeline == by_trainer or (name == "corrupted" and "teacher store does not verify" in by_pipeline)
        assert "\n" not in by_trainer and same, (name, by_trainer, by_pipeline)
        assert not (tmp_path / name).exists(), name  # nothing written: the checks only read
    assert (pipeline["store"] / "zarr.json").is_file()


def test_check_train_reports_what_the_trainer_will_use(pipeline, tmp_path):  # noqa: F811
    lines = check_training_inputs("tiny_cpu", opd_overrides(pipeline, tmp_path / "run"), world_size=2)
    text = "\n".join(lines)
    assert "teacher and policy consistency: ok" in text and "layout: world 2 = TP 1 x PP 1 x DP 2" in text
    assert f"store {pipeline['store']}: " in text and "tokens checked" in text
    with pytest.raises(LopdError, match="checkpoint.resume does not exist"):
        check_training_inputs("tiny_cpu", opd_overrides(pipeline, tmp_path / "run", **{"checkpoint.resume": tmp_path / "nope"}))


def _te_accepts(row: int, tp: int, sp: bool, fp8: bool) -> bool:
    """Transformer Engine's rule, written independently: sequence parallel splits the row evenly
    over TP; FP8 GEMMs need token counts divisible by 16 (the full row) and, under sequence
    parallel, each rank's local tokens (row / TP, checked before the all-gather) divisible by 8."""
    if sp and row % tp:
        return False
    return not fp8 or (row % 16 == 0 and (not sp or (row // tp) % 8 == 0))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("sp", [False, True])
def test_row_multiple_makes_every_row_length_valid_for_te(sp, fp8):
    """Every row the data can produce (trimmed to the row multiple, or untrimmed seq_length), for
    TP 1-8, with and without SP / FP8. (The old multiple, lcm(8, TP, 16), failed TE at TP 4 and 8.)"""
    from megatron_lopd.errors import ConfigError
    from megatron_lopd.training.preflight import row_multiple

    for tp in range(2 if sp else 1, 9):
        seq_length = 4096
        config = resolve_config("tiny_cpu", [f"parallel.tensor_parallel={tp}", f"parallel.sequence_parallel={str(sp).lower()}",
                                             f"model.fp8={'delayed' if fp8 else ''}", f"data.seq_length={seq_length}", "data.store=/s", "model.named=tiny"])
        if seq_length % math.lcm(16, 8 * tp if sp else 1, tp if sp else 1) and (sp or fp8):
            with pytest.raises(ConfigError, match="must be a multiple of"):
                row_multiple(config)
            continue
        m = row_multiple(config)
        rows = {min(seq_length, -(-used // m) * m) for used in range(1, seq_length + 1)} | {seq_length}
        bad = sorted(r for r in rows if not _te_accepts(r, tp, sp, fp8))
        assert not bad, f"TP {tp}: TE would refuse rows of {bad[:5]}"
        if sp and fp8 and tp in (4, 8):
            assert m == 8 * tp  # and not 16: rows of 16 * odd would fail
    config = resolve_config("tiny_cpu", ["parallel.tensor_parallel=3", "parallel.sequence_parallel=true", "model.fp8=current",
                                         "data.seq_length=4096", "data.store=/s", "model.named=tiny"])
    with pytest.raises(ConfigError, match=r"data.seq_length=4096 must be a multiple of 48"):
        row_multiple(config)
