"""Stale outputs: a verified output is "done" only if what it records about its making (model
fingerprints, prompt / data fingerprints, sampling and training settings; DESIGN section 4)
matches what the config asks now. Each `*_differences` function returns one
"field: recorded X, now Y" line per difference (empty: up to date)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megatron_lopd.errors import LopdError
from megatron_lopd.pipeline.config import EvalSettings, GenerateSettings, ScoreSettings
from megatron_lopd.provenance import cached_model_fingerprint


_FINGERPRINTS: dict[tuple, str] = {}


def eval_data_fingerprint(path: str | Path) -> str:
    """What `lopd eval` records as data_fingerprint."""
    from megatron_lopd.evaluation.evaluate import load_problems, problems_fingerprint

    path = Path(path).resolve()
    st = path.stat()
    key = ("eval", str(path), st.st_size, st.st_mtime_ns)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = problems_fingerprint(load_problems(path))
    return _FINGERPRINTS[key]


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _differs(out: list[str], name: str, recorded: Any, now: Any, note: str = "") -> None:
    """Append a difference line unless equal (1 == 1.0; a value the output did not record is not compared)."""
    if recorded is None and now is not None and name.endswith("_fingerprint"):
        out.append(f"{name}: not recorded, now {_short(now)}{note}")
    elif recorded != now:
        out.append(f"{name}: recorded {_short(recorded)}, now {_short(now)}{note}")


def _now_or_error(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except LopdError as exc:
        return f"<unreadable: {exc.what}>"
    except OSError as exc:
        return f"<unreadable: {exc}>"


def _rollout_manifest(path: Path):
    from megatron_lopd.artifacts import RolloutArtifact

    return RolloutArtifact.open(path, verify=False)


def _run_manifest(path: Path):
    from megatron_lopd.provenance import Manifest

    return Manifest.read(path, kind="run")


def _recorded(fn: Callable[[], Any]) -> Any:
    """A recorded value of an upstream output, or None when that output is missing or unreadable
    (then its stage is not done, and `plan` marks this one stale for that reason)."""
    try:
        return fn()
    except Exception:  # a half-written artifact can break a reader in any way
        return None


def model_now(path: Path) -> str:
    """A model's content fingerprint now, or `<unreadable: why>` (a difference, not an error)."""
    return _now_or_error(lambda: cached_model_fingerprint(path))


def recorded_export(run_dir: Path) -> Optional[str]:
    """The fingerprint of the HF export a training run recorded (None: unreadable)."""
    return _recorded(lambda: _run_manifest(run_dir).extra.get("hf_fingerprint"))


def recorded_artifact(path: Path) -> Optional[str]:
    """A rollout artifact's (SFT data, rollouts) data fingerprint (None: unreadable)."""
    return _recorded(lambda: _rollout_manifest(path).fingerprint)


def generation_differences(out: Path, section: str, model_field: str, model_fp: Callable[[], Optional[str]],
                           prompts: str, s: GenerateSettings, model_note: str = "") -> list[str]:
    """`lopd generate` output (SFT data or rollouts) against the model, prompts and settings asked now."""
    from megatron_lopd.generation.prompts import prompt_file_fingerprint

    art = _rollout_manifest(out)
    m = art.manifest
    diffs: list[str] = []
    model = model_fp()
    if model is not None:
        _differs(diffs, model_field, art.generator_fingerprint, model, model_note)
    _differs(diffs, "prompts", m.inputs.get("prompts_fingerprint"), _now_or_error(lambda: prompt_file_fingerprint(s.prompt_source(prompts))),
             f" ({prompts})")
    for key in ("n", "temperature", "top_p", "max_tokens", "seed"):
        _differs(diffs, f"{section}.{key}", m.params.get(key), getattr(s, key))
    _differs(diffs, f"{section}.thinking", m.params.get("thinking"), None if s.thinking is None else s.thinking == "on")
    _differs(diffs, f"{section}.backend", m.producer.get("backend"), s.backend)
    _differs(diffs, f"{section}.dtype", m.producer.get("dtype"), s.dtype)
    return diffs


def score_differences(store: Path, teacher: Path, rollouts: Path, s: ScoreSettings) -> list[str]:
    """The teacher store against the teacher, the rollouts and the scoring settings asked now."""
    from megatron_lopd.store.layout import read_meta

    meta = read_meta(store)
    prov = meta.provenance
    diffs: list[str] = []
    _differs(diffs, "teacher", prov.teacher_fingerprint, model_now(teacher), f" ({teacher})")
    current = recorded_artifact(rollouts)
    if current is not None:
        _differs(diffs, "rollouts_fingerprint", prov.rollouts_fingerprint, current)
    _differs(diffs, "score.top_k", meta.top_k, s.top_k)
    _differs(diffs, "score.backend", prov.engine, s.backend)
    _differs(diffs, "score.dtype", prov.extra.get("scoring_dtype"), s.dtype)
    return diffs


def training_differences(run_dir: Path, section: str, config: str, overrides: Sequence[str],
                         inputs: dict[str, Callable[[], Optional[str]]]) -> list[str]:
    """A training run's manifest against the trainer config the pipeline would run now (the preset
    plus overrides, resolved as `lopd train` does) and the fingerprints of its inputs. The paths
    the pipeline sets are not compared (a copied work dir is not stale): their content is, by
    fingerprint."""
    from megatron_lopd.training.config import resolve_config
    from megatron_lopd.training.run_dir import flatten_config

    manifest = _run_manifest(run_dir)
    diffs: list[str] = []
    for key, now in inputs.items():
        value = now()
        if value is not None:
            _differs(diffs, key, manifest.inputs.get(key), value)
    try:
        wanted = flatten_config(resolve_config(config, list(overrides)).to_dict())
    except LopdError as exc:
        return diffs + [f"{section}: the trainer config does not resolve now ({exc.what})"]
    recorded = flatten_config(manifest.params)
    changed = [k for k in wanted if k in recorded and recorded[k] != wanted[k] and k not in _PIPELINE_PATH_KEYS]  # keys a newer trainer added: not compared
    for key in changed[:3]:
        diffs.append(f"{section} {key}: recorded {_short(recorded[key])}, now {_short(wanted[key])}")
    if len(changed) > 3:
        diffs.append(f"(+{len(changed) - 3} more {section} settings)")
    return diffs


# trainer keys whose values are pipeline paths (build_stages' `train_overrides(..., paths)`)
_PIPELINE_PATH_KEYS = frozenset({"model.start_from", "data.store", "data.sft_data", "run_dir"})


def _timestamp(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    from datetime import datetime

    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()  # Manifest / store format
    except ValueError:
        return None


# Manifests' timestamps come from different nodes' clocks: allow this much skew.
_CLOCK_SKEW_S = 120.0


def _made_before(diffs: list[str], what: str, consumer_made: Optional[str], producer_made: Optional[str], producer: str) -> None:
    """An input without a recorded content fingerprint: the output must be younger than the input
    (an input rewritten after the output was made means the output is stale)."""
    c, p = _timestamp(consumer_made), _timestamp(producer_made)
    if c is not None and p is not None and p > c + _CLOCK_SKEW_S:
        diffs.append(f"{what}: {producer} was rewritten ({producer_made}) after this output was made ({consumer_made})")


def opd_differences(run_dir: Path, config: str, overrides: Sequence[str], store_dir: Path, sft_run: Path, sft_data: Path) -> list[str]:
    """The OPD run: the trainer settings, its start checkpoint (R), the store's teacher and rollouts
    and which scoring of them (the store's finalization time), the SFT data's generator."""
    from megatron_lopd.store.layout import read_meta

    store = _recorded(lambda: read_meta(store_dir))
    return training_differences(run_dir, "trainer", config, overrides, {
        "start_fingerprint": lambda: recorded_export(sft_run),
        "teacher_fingerprint": lambda: store.provenance.teacher_fingerprint if store else None,
        "rollouts_fingerprint": lambda: store.provenance.rollouts_fingerprint if store else None,
        "store_finalized_at": lambda: store.finalized_at if store else None,
        "sft_data_generator": lambda: _recorded(lambda: _rollout_manifest(sft_data).generator_fingerprint),
    })


def export_differences(hf_dir: Path, opd_run: Path) -> list[str]:
    """The HF export: of the OPD run's newest checkpoint, made after that run finished."""
    from megatron_lopd.provenance import Manifest
    from megatron_lopd.training.checkpointing import find_latest

    manifest = Manifest.read(hf_dir, kind="hf_export")
    diffs: list[str] = []
    latest = _recorded(lambda: find_latest(opd_run / "checkpoints"))
    if latest is not None:
        recorded = manifest.inputs.get("checkpoint")  # by name: a copied work dir is not stale
        _differs(diffs, "checkpoint", Path(recorded).name if recorded else None, Path(latest).name)
    run = _recorded(lambda: _run_manifest(opd_run))
    if run is not None:
        _differs(diffs, "run_inputs", manifest.inputs.get("run_inputs"), run.inputs)
        _made_before(diffs, "opd_run", manifest.created_at, run.created_at, f"the run {opd_run}")
    return diffs


def eval_differences(out: Path, student: Path, data: str, e: EvalSettings) -> list[str]:
    from megatron_lopd.evaluation.evaluate import read_results
    from megatron_lopd.provenance import Manifest

    _records, summary = read_results(out)
    diffs: list[str] = []
    exported = _recorded(lambda: Manifest.read(student, kind="hf_export").fingerprint)
    if exported is not None:
        _differs(diffs, "model_fingerprint", summary.model_fingerprint, exported)
    _differs(diffs, "eval_data", summary.data_fingerprint, _now_or_error(lambda: eval_data_fingerprint(data)), f" ({data})")
    for key in ("samples_per_problem", "max_tokens", "temperature", "top_p"):
        _differs(diffs, f"eval.{key}", summary.config.get(key), getattr(e, key))
    _differs(diffs, "eval.backend", summary.backend or summary.config.get("backend"), e.backend)
    return diffs


