"""What the pipeline checks: each stage output's verification (thin adapters over the checks of
the artifacts' owners: rollout artifacts, the teacher store, training runs, HF exports, eval
results), and the checks of a stage's inputs before it runs or waits in a queue."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

from megatron_lopd.errors import LopdError
from megatron_lopd.provenance import cached_model_fingerprint


def verify_rollouts(path: Path) -> str:
    from megatron_lopd.artifacts import RolloutArtifact

    artifact = RolloutArtifact.open(path, verify=True)
    return f"{len(artifact)} records"


def verify_store(path: Path) -> str:
    from megatron_lopd.store import require_valid_store

    report = require_valid_store(path)
    return f"{report.shards_checked} shards, {report.tokens_checked} tokens checked"


def verify_eval(path: Path) -> str:
    from megatron_lopd.evaluation.evaluate import read_results

    _records, summary = read_results(path)
    return summary.console_line("eval")


def owned_hf_export(path: Path) -> bool:
    """True if ``path`` holds only what `lopd convert to-hf` writes (weight shards, config, index,
    tokenizer and generation files, its manifest): a partial export may be cleared for a rerun.
    A subdirectory, any other kind of file or another artifact's manifest proves it is not one."""
    from megatron_lopd.provenance import MANIFEST_NAME, Manifest
    from megatron_lopd.runtime.files import LOCK_NAME

    entries = [e for e in path.iterdir() if e.name != LOCK_NAME]
    if any(not e.is_file() or e.is_symlink() or e.suffix not in _HF_EXPORT_SUFFIXES for e in entries):
        return False
    if (path / MANIFEST_NAME).is_file():
        try:
            Manifest.read(path, kind="hf_export")
        except LopdError:
            return False
    return any(e.suffix == ".safetensors" or e.name in ("config.json", MANIFEST_NAME) for e in entries)


_HF_EXPORT_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".tmp")


def check_training_inputs(config: str, overrides: Sequence[str] = (), world_size: Optional[int] = None,
                          verified: Optional[Mapping[Path, str]] = None) -> list[str]:
    """What a training job needs, checked without a GPU before it is queued: the trainer config and
    overrides, the start checkpoint, the data (store complete with valid checksums, or the SFT
    artifact), teacher and policy consistency, the parallel layout against `world_size`, and an
    explicit resume checkpoint. `verified`: data this invocation verified already (path -> its
    verification line), not checked again. Raises a LopdError naming the problem; returns report lines."""
    from megatron_lopd.training.config import resolve_config
    from megatron_lopd.training.data import OfflineData
    from megatron_lopd.training.losses import loss_spec
    from megatron_lopd.training.preflight import preflight

    cfg = resolve_config(config, list(overrides))
    checked = preflight(cfg, OfflineData(), world_size=world_size).report(cfg)  # the start model first, as the trainer does
    what, data, verify = ("store", cfg.data.store, verify_store) if loss_spec(cfg.loss).distills else ("SFT data", cfg.data.sft_data, verify_rollouts)
    known = (verified or {}).get(Path(data))
    return [f"config {config}", f"{what} {data}: {known if known is not None else verify(Path(data))}", *checked]


def check_teacher_wrote_sft_data(teacher: Path, sft_data: Path) -> None:
    """Finished SFT data is skipped on a rerun: if the config's teacher changed since, scoring with
    it would break teacher consistency. Compare content fingerprints before anything runs."""
    from megatron_lopd.provenance import Lineage

    try:
        writer, _tokenizer = Lineage.writer_of(sft_data)
    except LopdError:
        return  # not written yet: this run writes it with this teacher
    Lineage(teacher=cached_model_fingerprint(teacher), sft_data_writer=writer).check()
