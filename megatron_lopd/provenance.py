"""Fingerprints, manifests and the teacher-consistency checks (DESIGN section 4).

A model fingerprint is derived from a checkpoint's content (weights, config, tokenizer),
never from its path or name. Hashing a 64 GB teacher takes about a minute, so the
digest of each file is cached keyed by (path, size, mtime).

Every artifact directory (SFT data, rollouts, teacher store, training run, HF export)
carries a `manifest.json` written through `Manifest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_lopd.errors import ArtifactError, ConsistencyError

MANIFEST_NAME = "manifest.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".distcp")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")
_CHUNK = 16 << 20


def _cache_dir() -> Path:
    return Path(os.environ.get("LOPD_CACHE_DIR", Path.home() / ".cache" / "megatron_lopd")) / "file_digests"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, cached by (absolute path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    cache = _cache_dir() / key[:2] / key
    try:
        return cache.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        from megatron_lopd.runtime.files import atomic_write

        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, digest)
    except OSError:
        pass  # a read-only home only costs re-hashing
    return digest


def _canonical_json_file(path: Path) -> bytes:
    return json.dumps(json.loads(path.read_text()), sort_keys=True, separators=(",", ":")).encode()


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of a tokenizer: the token <-> id mapping, special tokens and chat template.

    Canonical JSON of the tokenizer files, so two copies of one tokenizer agree even if
    whitespace or key order differ.
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256(b"tokenizer-v1")
    found = False
    for name in _TOKENIZER_FILES:
        p = model_dir / name
        if not p.is_file():
            continue
        found = True
        h.update(name.encode())
        if name == "tokenizer_config.json":
            cfg = json.loads(p.read_text())
            # Fields that do not change tokenization (paths, class names, limits) are left out.
            keep = {k: cfg.get(k) for k in sorted(cfg) if k in _TOKENIZER_CONFIG_KEYS}
            h.update(json.dumps(keep, sort_keys=True).encode())
        elif name.endswith(".json"):
            h.update(_canonical_json_file(p))
        else:
            h.update(p.read_bytes())
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        h.update(template.read_bytes())
    if not found:
        raise ArtifactError(
            f"{model_dir}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})",
            "save the tokenizer next to the weights (tokenizer.save_pretrained(dir))",
        )
    return "tok-" + h.hexdigest()[:32]


_TOKENIZER_CONFIG_KEYS = {
    "added_tokens_decoder",
    "additional_special_tokens",
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "chat_template",
    "add_bos_token",
    "add_eos_token",
}


def chat_template(model_dir: str | Path) -> str | None:
    model_dir = Path(model_dir)
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        return template.read_text()
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("chat_template")
    return None


def model_fingerprint(model_dir: str | Path) -> str:
    """Content fingerprint of a Hugging Face model directory: config, weights, tokenizer."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ArtifactError(f"{model_dir}: not a directory", "pass a Hugging Face model directory")
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise ArtifactError(
            f"{model_dir}: no weight files (*.safetensors or *.bin)",
            "point at a directory written by save_pretrained or `lopd convert to-hf`",
        )
    h = hashlib.sha256(b"model-v1")
    config = model_dir / "config.json"
    if config.is_file():
        h.update(_canonical_json_file(config))
    for p in weights:
        h.update(p.name.encode())
        h.update(file_digest(p).encode())
    h.update(tokenizer_fingerprint(model_dir).encode())
    return "model-" + h.hexdigest()[:32]


_FINGERPRINTS: dict[tuple, str] = {}


def cached_model_fingerprint(path: str | Path) -> str:
    """`model_fingerprint`, computed at most once per process for unchanged content (keyed by
    the directory's files' names, sizes and mtimes): a 64 GB teacher hashes once per command."""
    path = Path(path).resolve()
    try:
        signature = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in path.iterdir() if e.is_file()))
    except OSError:
        return model_fingerprint(path)  # raises the usual one-line ArtifactError
    key = (str(path), signature)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = model_fingerprint(path)
    return _FINGERPRINTS[key]


def code_version() -> str:
    import megatron_lopd

    version = megatron_lopd.__version__
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if rev.returncode == 0 and rev.stdout.strip():
            version += f"+g{rev.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def files_fingerprint(paths: list[str | Path]) -> str:
    """Fingerprint of a set of files (a prompt set, a rollout artifact's data files)."""
    h = hashlib.sha256(b"files-v1")
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        h.update(file_digest(p).encode())
    return "data-" + h.hexdigest()[:32]


@dataclass
class Manifest:
    """What produced an artifact. `kind`: sft_data | rollouts | teacher_store | run | hf_export.

    `producer`: the model that wrote it (fingerprint, tokenizer fingerprint, path for
    humans). `inputs`: fingerprints of the artifacts it was made from. `params`: sampling
    or training parameters. `extra`: anything kind-specific.
    """

    kind: str
    fingerprint: str = ""
    producer: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    code_version: str = field(default_factory=code_version)
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def write(self, directory: str | Path) -> Path:
        from megatron_lopd.runtime.files import atomic_write

        path = Path(directory) / MANIFEST_NAME
        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path, kind: str | None = None) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ArtifactError(f"{directory}: no {MANIFEST_NAME}", "regenerate the artifact with the lopd tools")
        try:
            m = cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ArtifactError(f"{path}: unreadable manifest ({exc})", "regenerate the artifact") from exc
        if kind is not None and m.kind != kind:
            raise ArtifactError(f"{directory}: is a {m.kind!r} artifact, expected {kind!r}", "check the path")
        return m


def write_hf_manifest(hf_dir: str | Path, run_dir: str | Path, checkpoint: str | Path) -> Path:
    """Provenance of an HF export of ``checkpoint``, a checkpoint of the training run ``run_dir``."""
    run = Manifest.read(run_dir, kind="run")
    return Manifest(
        kind="hf_export",
        fingerprint=model_fingerprint(hf_dir),
        producer={"tool": "lopd convert to-hf", "tokenizer": tokenizer_fingerprint(hf_dir)},
        inputs={"checkpoint": str(checkpoint), "run": str(run_dir), "run_inputs": run.inputs},
        params={"final_step": run.extra.get("final_step")},
    ).write(hf_dir)


def check_hf_files(path: str | Path) -> None:
    """A Hugging Face model dir has a config.json and weight files."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{path}: no config.json", "rerun the stage that exports it")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ArtifactError(f"{path}: no weight files", "rerun the stage that exports it")


def verify_hf_export(path: str | Path) -> str:
    """An HF export: config.json + weights + a manifest whose fingerprint matches the content."""
    check_hf_files(path)
    manifest = Manifest.read(path, kind="hf_export")
    actual = cached_model_fingerprint(path)
    if manifest.fingerprint != actual:
        raise ArtifactError(f"{path}: weights changed since export (manifest {manifest.fingerprint}, content {actual})", "rerun the export stage")
    return f"{actual} from {manifest.inputs.get('checkpoint')}"


# ---------------------------------------------------------------------------------------
# Consistency checks. Each raises ConsistencyError naming both sides, unless opted out.


@dataclass(frozen=True)
class ConsistencyOptOut:
    """Research ablations only: recorded in the run's metadata and logged loudly."""

    allow_inconsistent_teacher: bool = False
    allow_policy_mismatch: bool = False

    def any(self) -> bool:
        return self.allow_inconsistent_teacher or self.allow_policy_mismatch


@dataclass(frozen=True)
class Lineage:
    """Which model made each input of a stage, by content fingerprint, and the paper's key finding
    as one rule (DESIGN section 4): the teacher whose log-probs train the student must be the
    model that wrote the SFT data (a consistent teacher), unless the store was corrected for the
    teachers' style difference (`teacher_residualized`, DESIGN section 1); the rollouts must have
    been sampled by the checkpoint training starts from; every stage must share one tokenizer.

    A field left None is unknown. A relation is checked when both sides are known; `check`'s
    `require_*` turn an unknown side into a violation too (training requires both). Violations
    of the first two rules can be opted out of for research ablations (`ConsistencyOptOut`): they
    are then returned, for the caller to record in its manifest and log loudly. A tokenizer
    mismatch never can: ids would mean different tokens.
    """

    teacher: str | None = None  # scored the store (or scores online)
    sft_data_writer: str | None = None  # generated the SFT data the start checkpoint was trained on
    rollout_policy: str | None = None  # sampled the rollouts
    start: str | None = None  # the checkpoint training starts from
    start_where: str = "the start checkpoint"  # for messages: its path, or "model.named=..."
    start_random: bool = False  # a random-weight model (model.named): never a rollout policy
    teacher_residualized: bool = False  # the store's scores carry the cross-teacher style correction (store.style)
    tokenizers: dict[str, str | None] = field(default_factory=dict)  # stage -> tokenizer fingerprint

    @staticmethod
    def writer_of(artifact_dir: str | Path) -> tuple[str, str]:
        """(generator, tokenizer) fingerprints from a rollout artifact's (SFT data, rollouts) manifest."""
        producer = Manifest.read(artifact_dir).producer
        return producer["generator_fingerprint"], producer["tokenizer_fingerprint"]

    def check(self, *, opt_out: ConsistencyOptOut = ConsistencyOptOut(), require_sft_data_writer: bool = False,
              require_start: bool = False) -> list[str]:
        """Raise ConsistencyError (naming both sides) for a violation not opted out; return the opted-out ones."""
        warnings: list[str] = []

        def violated(what: str, fix: str, allowed: bool) -> None:
            if not allowed:
                raise ConsistencyError(what, fix)
            warnings.append(what)

        if require_sft_data_writer and self.sft_data_writer is None:
            violated("teacher consistency cannot be verified: the SFT data's generator is unknown",
                     "pass data.sft_data=DIR (the SFT artifact) or teacher_consistency.sft_data_generator=FINGERPRINT, "
                     "or set teacher_consistency.allow_inconsistent_teacher=true for an ablation", opt_out.allow_inconsistent_teacher)
        if require_start and self.start_random:
            violated("a random-weight model (model.named) cannot be the policy that sampled the rollouts",
                     "start from the checkpoint that generated the rollouts, or set teacher_consistency.allow_policy_mismatch=true",
                     opt_out.allow_policy_mismatch)
        elif require_start and self.start is None:
            violated(f"{self.start_where}: the checkpoint records no source fingerprint, so the rollout policy cannot be checked",
                     "start from the HF dir the rollouts were sampled with, or convert it with `lopd convert from-hf`",
                     opt_out.allow_policy_mismatch)
        if None not in (self.teacher, self.sft_data_writer) and self.teacher != self.sft_data_writer and not self.teacher_residualized:
            violated(f"teacher inconsistency: the store was scored by {self.teacher} but the SFT data was generated by {self.sft_data_writer}",
                     "re-score the rollouts with the model that wrote the SFT data, or correct this store for the teachers' style "
                     "difference with `lopd store residualize STORE --out STORE2` and train on STORE2 "
                     "(allow_inconsistent_teacher=true only for an ablation)", opt_out.allow_inconsistent_teacher)
        if None not in (self.rollout_policy, self.start) and self.rollout_policy != self.start:
            violated(f"policy mismatch: the rollouts were sampled by {self.rollout_policy} but training starts from {self.start}",
                     "start from the checkpoint that generated the rollouts, or set allow_policy_mismatch=true", opt_out.allow_policy_mismatch)
        if len({fp for fp in self.tokenizers.values() if fp}) > 1:
            sides = ", ".join(f"{k}={v}" for k, v in sorted(self.tokenizers.items()) if v)
            raise ConsistencyError(f"tokenizer mismatch across stages: {sides}", "use one tokenizer for teacher, student, rollouts and store")
        return warnings
