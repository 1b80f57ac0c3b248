"""Training checkpoints: one Megatron dist checkpoint with model, optimizer and RNG, plus metadata.

Layout of `<run_dir>/checkpoints/`:

    step_0000050/                 a megatron.core.dist_checkpointing directory:
        ...                         "model" (the same keys as `lopd convert from-hf` writes),
                                    "optimizer" (Adam moments, fp32 main params), "rng"
        lopd_checkpoint.json      format_version, hf_config, layout, optimizer_format,
                                  iteration, kind and the "trainer" state: step, scheduler,
                                  data position, counters
        tokenizer/                the student's tokenizer
    latest                        name of the newest complete checkpoint (atomic replace)

A checkpoint is written under `step_N.partial` and renamed once every rank has finished,
then `latest` is replaced: a run killed at any moment leaves either the previous or the
new checkpoint as latest, never a torn one. `model.start_from` can point at any of these
directories (the model loader ignores the optimizer part).

Another layout on resume. The model part loads at any TP / PP / EP / DP (global tensors).
The distributed optimizer's state is written as `checkpoint.optimizer_format` says (the costs
are in the comment above `_UNRECORDED_FORMAT`): `dp_reshardable` (the default) resumes at any
DP size but only at its own TP / PP / EP, another layout is refused before loading;
`fully_reshardable` resumes at any layout. After a TP / PP change the RNG state is not
restored (the saved per-rank streams do not map onto the new ranks); the streams start from
the run's seed instead, which changes no number in training here (Qwen3 has no dropout, the
data order has its own seed).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.models.checkpoint import FORMAT_VERSION, copy_tokenizer_files, read_checkpoint_metadata, trusted_te_extra_state
from megatron_lopd.models.checkpoint import METADATA_FILE as METADATA_NAME
from megatron_lopd.models.qwen3 import Qwen3Config
from megatron_lopd.runtime.files import atomic_write

LATEST_NAME = "latest"
_PARTIAL = ".partial"
# How the distributed optimizer's state is written (`checkpoint.optimizer_format`; megatron-core's
# `distrib_optim_sharding_type`, the same in 0.16-0.19). "dp_reshardable" stores each rank's flat
# buffers: no communication at save, loadable at another DP size only. "fully_reshardable"
# gathers each parameter's state over DP into model space: loadable at any TP / PP / EP / DP,
# at the price of that gather at every save (measured on CPU: 2x the save time and the peak
# memory of dp_reshardable, same size; on GPU the gather runs over NCCL in GPU memory, about
# 4 B x parameters per model-parallel rank per state). Checkpoints that record no format
# were written dp_reshardable. (0.16.1's default, fully_sharded_model_space, fails on save:
# "flattened_range is not supported".) A plain (non-distributed) optimizer ignores the choice.
_UNRECORDED_FORMAT = "dp_reshardable"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def read_metadata(ckpt_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata, checked against its files (models.checkpoint's reader)."""
    return read_checkpoint_metadata(ckpt_dir)


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (via the `latest` marker), or None."""
    root = Path(root)
    marker = root / LATEST_NAME
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / METADATA_NAME).is_file():
        raise ArtifactError(f"{marker} names {path.name}, which is missing or incomplete", f"delete {marker} to start over, or restore {path}")
    return path


# ----------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    state = {
        "random": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data):
    """One RNG state per (PP, TP) rank, replicated over DP (Megatron's convention)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    return ShardedObject(
        "rng_state",
        data,
        (pp, tp),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "expert_parallel": ps.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel": ps.get_expert_tensor_parallel_world_size(),
        "data_parallel": ps.get_data_parallel_world_size(),
    }


def optimizer_format(meta: dict[str, Any]) -> str:
    """The sharding type a checkpoint's distributed-optimizer state was written in."""
    return meta.get("optimizer_format", _UNRECORDED_FORMAT)


# The parallel sizes that shape the distributed optimizer's per-rank buffers (the expert ones
# only in an MoE model), with their short names.
_BUFFER_LAYOUT = {"tensor_parallel": "TP", "pipeline_parallel": "PP"}
_EXPERT_BUFFER_LAYOUT = {**_BUFFER_LAYOUT, "expert_parallel": "EP", "expert_tensor_parallel": "ETP"}


def check_resume_layout(ckpt_dir: str | Path, meta: dict[str, Any], layout: dict[str, int]) -> None:
    """Refuse to resume `ckpt_dir` (metadata `meta`) at `layout` (sizes by name, as in the
    metadata) when its optimizer state cannot be resharded to it: a one-line ConfigError."""
    fmt = optimizer_format(meta)
    if fmt == "fully_reshardable":
        return
    names = _EXPERT_BUFFER_LAYOUT if Qwen3Config.from_hf(meta["hf_config"]).is_moe else _BUFFER_LAYOUT
    # Expert TP was not recorded before it was configurable: megatron-core set it to TP.
    saved = {k: meta.get(k, meta["tensor_parallel"]) for k in names}
    asked = {k: layout[k] for k in names}
    if saved != asked:
        raise ConfigError(
            f"{ckpt_dir}: its optimizer state ({fmt}) reshards over data parallel only; it was saved at "
            f"{_sizes(saved, names)}, this run asks for {_sizes(asked, names)}",
            f"resume with {' '.join(f'parallel.{k}={v}' for k, v in saved.items())} (checkpoints written with "
            "checkpoint.optimizer_format=fully_reshardable resume at any layout)")


def _sizes(layout: dict[str, int], names: dict[str, str]) -> str:
    return " ".join(f"{names[k]}={v}" for k, v in layout.items())


# ----------------------------------------------------------------------------- save / load


def save_training_checkpoint(
    root: str | Path,
    step: int,
    *,
    model,
    optimizer,
    qwen3,
    tokenizer_dir: str | Path | None,
    trainer_state: dict[str, Any],
    start_fingerprint: str | None = None,
    keep_last: int = 0,
    optimizer_format: str = "dp_reshardable",
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / step_dir_name(step)
    partial = final.with_name(final.name + _PARTIAL)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
        partial.mkdir()
    dist.barrier()
    model_sd = model.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata={"distrib_optim_sharding_type": optimizer_format}),
        "rng": _rng_sharded_object(_rng_state()),
    }
    dist_checkpointing.save(state, str(partial), sharded_strategy=_fully_parallel_save())
    dist.barrier()
    if rank == 0:
        layout = _layout()
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": "training",
            "hf_config": qwen3.to_hf_dict(),
            "tensor_parallel": layout["tensor_parallel"],
            "pipeline_parallel": layout["pipeline_parallel"],
            "expert_parallel": layout["expert_parallel"],
            "expert_tensor_parallel": layout["expert_tensor_parallel"],
            "data_parallel": layout["data_parallel"],
            "optimizer_format": optimizer_format,
            "iteration": step,
            "start_fingerprint": start_fingerprint,  # what the run started from (not this model)
            "trainer": trainer_state,
        }
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, partial / "tokenizer")
        atomic_write(partial / METADATA_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if final.exists():  # written by a run that was killed before updating `latest`
            shutil.rmtree(final)
        os.replace(partial, final)  # a whole directory at once: more than atomic_write's one file
        atomic_write(root / LATEST_NAME, final.name + "\n")
        if keep_last > 0:
            steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(_PARTIAL))
            for old in steps[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _fully_parallel_save():
    """megatron-core's save strategy with the writes of what is replicated over DP (the model,
    and the optimizer state, which fully_reshardable gathers onto every DP rank) spread over the
    DP ranks instead of all falling to DP rank 0 (Megatron-LM's default, --ckpt-fully-parallel-save)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), ps.get_data_parallel_group(with_context_parallel=True))


def load_training_checkpoint(ckpt_dir: str | Path, *, model, optimizer) -> dict[str, Any]:
    """Load model, optimizer and (same TP/PP layout only) RNG state; returns the trainer state.

    Collective: every rank calls it. The DP size may always differ from the one that saved;
    TP / PP / EP only for a `fully_reshardable` checkpoint (others are refused before loading,
    see the module docstring). The optimizer state is read in the format it was written in.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    meta = read_metadata(ckpt_dir)
    if "trainer" not in meta:
        raise ArtifactError(
            f"{ckpt_dir}: a {meta.get('kind')!r} checkpoint without trainer state cannot be resumed",
            "resume from a checkpoint written by `lopd train`, or start a new run with model.start_from=" + str(ckpt_dir),
        )
    layout = _layout()
    try:
        check_resume_layout(ckpt_dir, meta, layout)
    except ConfigError as exc:
        exc.all_ranks = True  # every rank reads the same metadata: the CLI prints it once
        raise
    _init_adam_state(optimizer)
    same_model_layout = all(meta.get(k) == layout[k] for k in ("tensor_parallel", "pipeline_parallel"))
    model_sd = model.sharded_state_dict()
    written_as = {"distrib_optim_sharding_type": optimizer_format(meta)}
    request = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=written_as)}
    if same_model_layout:
        request["rng"] = _rng_sharded_object(None)
    with trusted_te_extra_state():  # our own checkpoint: an fp8=delayed model's extra state is a pickle
        try:
            state = dist_checkpointing.load(request, str(ckpt_dir))
        except Exception as exc:  # megatron raises CheckpointingException / KeyError / RuntimeError
            raise ArtifactError(f"{ckpt_dir}: cannot load the checkpoint ({type(exc).__name__}: {exc})", "resume from another checkpoint") from exc
        model.load_state_dict(state["model"])
    with torch.no_grad(), _keep_adam_step_on_load(optimizer):  # no_grad: megatron copies into views of leaf parameters
        optimizer.load_state_dict(state["optimizer"])
    _set_adam_step(optimizer, int(meta["trainer"]["optimizer_updates"]))
    if same_model_layout and state.get("rng") is not None:
        _set_rng_state(state["rng"])
    return meta["trainer"]


def _with_torch_adam(optimizer) -> list:
    """The Megatron optimizers (of a chain) around a plain torch Adam/AdamW (CPU runs; on GPU
    megatron-core uses TE's FusedAdam, which keeps `step` in its param groups and needs none
    of this)."""
    chain = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in chain if isinstance(getattr(o, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))]


def _torch_adams(optimizer) -> list[torch.optim.Optimizer]:
    return [o.optimizer for o in _with_torch_adam(optimizer)]


@contextlib.contextmanager
def _keep_adam_step_on_load(optimizer):
    """megatron-core's distributed optimizer (0.16.1 to 0.19) loads `fully_reshardable` state by
    copying every per-parameter state tensor of the inner optimizer from the checkpoint, which
    never holds torch Adam's `step` (KeyError 'step'). During the load, a tensor the checkpoint
    lacks keeps its live value (`_set_adam_step` then sets the step)."""
    patched = [o for o in _with_torch_adam(optimizer) if hasattr(o, "_set_main_param_and_optimizer_states")]
    for o in patched:
        def set_states(model_param, tensors, o=o, set_states=o._set_main_param_and_optimizer_states):
            set_states(model_param, {**o._get_main_param_and_optimizer_states(model_param), **tensors})

        o._set_main_param_and_optimizer_states = set_states  # an instance attribute over the method
    try:
        yield
    finally:
        for o in patched:
            del o._set_main_param_and_optimizer_states


def _init_adam_state(optimizer) -> None:
    """A fresh torch Adam has no per-parameter state; megatron-core 0.16.1's distributed
    optimizer asserts on that when building the load request. Zero state, step 0: every
    value is overwritten by the load."""
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                st = adam.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _set_adam_step(optimizer, updates: int) -> None:
    """Restore Adam's step count (its bias correction). megatron-core 0.16.1's distributed
    optimizer load copies the live, pre-load `step` over the checkpoint's value for torch
    Adam; the trainer records the number of updates itself."""
    for adam in _torch_adams(optimizer):
        for st in adam.state.values():
            if "step" in st:
                st["step"] = torch.tensor(float(updates))


def record_hf_export(ckpt_dir: str | Path, hf_dir: str | Path, hf_fingerprint: str) -> None:
    """Note in a checkpoint's metadata the HF export made from it (its fingerprint links the
    checkpoint to rollouts later sampled from the export)."""
    path = Path(ckpt_dir) / METADATA_NAME
    meta = json.loads(path.read_text())
    meta.update(hf_export=str(hf_dir), hf_fingerprint=hf_fingerprint)
    atomic_write(path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
