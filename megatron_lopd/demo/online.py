"""Standard (online) OPD on the project's trainer, for the demo's comparison with Lightning OPD.

Standard OPD (DESIGN section 1, "the baseline it replaces"): every step the *current*
student samples fresh rollouts and a live teacher scores them; the loss is the same as
Lightning OPD's. The trainer (`training.loop.Trainer`) reads fixed data (store or SFT
artifact), so this module gives it a data stream that produces each step's batch on
demand:

1. copy the live Megatron student's weights into a Hugging Face model (`gather_hf_state_dict`),
2. sample one response per prompt with the generation backend (`generate`, raw log-probs
   recorded, the same sampler and seeds scheme as `lopd generate`),
3. score the responses with the teacher backend (`score`, the same call as `lopd score`),
4. collate them with the trainer's own packing (`TrainData.build_step`).

Everything else (model, optimizer, loss, metrics, checkpoints, HF export) is the
trainer's: `OnlineOPD` is a `training.data.DataProvider` and `OnlineData` its `DataStream`.
Single process only (DP = TP = PP = 1), which is what the demo runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from megatron_lopd.errors import ConfigError
from megatron_lopd.training.config import TrainConfig
from megatron_lopd.training.data import SequenceSource


@dataclass
class OnlineConfig:
    """Where fresh rollouts come from. `max_tokens` bounds each response; `top_k` is the
    teacher's top-k kept per position (for the top-k losses and the top-1 metric)."""

    teacher: str
    prompts: str
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    top_k: int = 8
    seed: int = 0
    backend: str = "hf"
    backend_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OnlineStats:
    """Cost of the live parts: teacher forward tokens (prompt + response of every scored
    sequence, as `lopd score` counts them), sampled response tokens, and their seconds."""

    teacher_forward_tokens: int = 0
    sampled_tokens: int = 0
    generate_s: float = 0.0
    score_s: float = 0.0
    sync_s: float = 0.0
    steps: int = 0


class OnlineSource(SequenceSource):
    """The prompt set as the trainer's setup sees it: sizes and capabilities, no stored data."""

    def __init__(self, prompts: str, prompt_lengths: Sequence[int], max_tokens: int, top_k: int, fingerprint: str):
        self.path = f"online:{prompts}"
        self.fingerprint = fingerprint
        self.top_k = top_k
        self.has_teacher = True
        self.has_rollout_logprobs = True
        self._lengths = np.asarray(prompt_lengths, dtype=np.int64) + max_tokens  # the longest a sequence can get

    def __len__(self) -> int:
        return len(self._lengths)

    def lengths(self) -> np.ndarray:
        return self._lengths

    def fetch(self, indices):
        raise NotImplementedError("online rollouts are produced per step by OnlineData")


class OnlineData:
    """The trainer's data stream for standard OPD: each `next_step` samples and scores a fresh batch."""

    def __init__(self, trainer, online: OnlineConfig, prompt_ids: list[list[int]], student, teacher):
        self.trainer = trainer
        self.cfg = online
        self.prompt_ids = prompt_ids
        self.student, self.teacher = student, teacher
        self.consumed = 0
        self.stats = OnlineStats()

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def state_dict(self) -> dict:
        d = self.trainer.config.data
        return {"consumed": self.consumed, "seed": d.seed, "global_batch": d.global_batch, "num_sequences": len(self), "online": True}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_sequences"]) != len(self):
            raise ConfigError(f"online prompts: {len(self)} prompts, the checkpoint was trained on {state['num_sequences']}", "resume with the same prompt file")
        self.consumed = int(state["consumed"])

    def close(self) -> None:
        for backend in (self.student, self.teacher):
            backend.close()

    def _sync_student(self) -> None:
        """The sampler gets the live student's current weights (HF names, full tensors)."""
        import torch

        from megatron_lopd.models.hf_mapping import gather_hf_state_dict

        state = gather_hf_state_dict(self.trainer.inner_model, self.trainer.start.qwen3)
        with torch.no_grad():
            self.student.model.load_state_dict(state, strict=True)

    def next_step(self):
        from megatron_lopd.generation.base import SamplingParams
        from megatron_lopd.training.data import InMemorySource, TrainData, TrainSequence, step_indices

        cfg, tr, d = self.cfg, self.trainer, self.trainer.config.data
        n = len(self.prompt_ids)
        indices = step_indices(n, self.consumed, d.global_batch, d.seed, d.shuffle)
        epoch = self.consumed // n
        t0 = time.perf_counter()
        self._sync_student()
        t1 = time.perf_counter()
        params = SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=cfg.seed + 1000 * epoch, record_logprobs=True
        )
        prompts = [self.prompt_ids[int(i)] for i in indices]
        samples = [per_prompt[0] for per_prompt in self.student.generate(prompts, params, prompt_indices=[int(i) for i in indices])]
        t2 = time.perf_counter()
        responses = [s.response_ids for s in samples]
        scored = self.teacher.score(prompts, responses, cfg.top_k)
        t3 = time.perf_counter()
        sequences = [
            TrainSequence(
                index=j,
                prompt_ids=np.asarray(p, np.int32),
                response_ids=np.asarray(s.response_ids, np.int32),
                teacher_logprobs=sc.token_logprobs,
                topk_ids=sc.topk_ids,
                topk_logprobs=sc.topk_logprobs,
                rollout_logprobs=np.asarray(s.logprobs, np.float32),
            )
            for j, (p, s, sc) in enumerate(zip(prompts, samples, scored))
        ]
        st = self.stats
        st.teacher_forward_tokens += sum(len(p) + len(r) for p, r in zip(prompts, responses))
        st.sampled_tokens += sum(map(len, responses))
        st.sync_s += t1 - t0
        st.generate_s += t2 - t1
        st.score_s += t3 - t2
        st.steps += 1
        batch = TrainData(
            InMemorySource(sequences, path=f"online step {self.consumed // d.global_batch + 1}"),
            global_batch=d.global_batch,
            seq_length=d.seq_length,
            micro_batch_size=d.micro_batch_size,
            seed=0,
            shuffle=False,
            pack=d.pack,
            trim_padding=d.trim_padding,
            pad_to_multiple=d.pad_to_multiple,
            with_teacher=True,
            top_k=tr.source.top_k,
            with_rollout=True,
            vocab_size=tr.start.qwen3.vocab_size,
            pad_id=tr.start.qwen3.pad_token_id if isinstance(tr.start.qwen3.pad_token_id, int) else 0,
        ).build_step(0)
        self.consumed += d.global_batch
        return batch


class OnlineOPD:
    """The trainer's data provider for standard OPD: a live sampler (the student) and teacher."""

    def __init__(self, online: OnlineConfig):
        self.online = online
        self.data: OnlineData | None = None

    def requires_lineage(self, config) -> bool:
        return False  # the rollouts come from the live student itself; no stored teacher scores

    def open(self, config, start):
        import torch

        from megatron_lopd.generation.backends import load_backend
        from megatron_lopd.generation.prompts import load_prompt_set, load_tokenizer
        from megatron_lopd.provenance import Lineage, model_fingerprint, tokenizer_fingerprint

        if torch.distributed.get_world_size() != 1:
            raise ConfigError("the online OPD data stream runs in a single process", "launch without torchrun (world size 1)")
        cfg = self.online
        if start.kind != "hf":
            raise ConfigError(f"{start.path}: online OPD starts from a Hugging Face dir (the sampler loads it)", "pass the student's HF export as model.start_from")
        teacher_fp = model_fingerprint(cfg.teacher)
        lineage = Lineage(teacher=teacher_fp, tokenizers={"student": start.tokenizer_fingerprint, "teacher": tokenizer_fingerprint(cfg.teacher)})
        lineage.check()  # before loading two models: the teacher must read the student's ids
        prompt_set = load_prompt_set(cfg.prompts, load_tokenizer(start.path))
        self._prompt_ids = prompt_set.token_ids
        self._backends = (
            load_backend(cfg.backend, start.path, seed=cfg.seed, **cfg.backend_options),
            load_backend(cfg.backend, cfg.teacher, **cfg.backend_options),
        )
        source = OnlineSource(cfg.prompts, [len(p) for p in prompt_set.token_ids], cfg.max_tokens, cfg.top_k, prompt_set.fingerprint)
        record = {
            "mode": "online",
            "start_from": str(start.path),
            "start_fingerprint": start.fingerprint,
            "teacher": str(cfg.teacher),
            "teacher_fingerprint": teacher_fp,
            "prompts": str(cfg.prompts),
            "prompts_fingerprint": prompt_set.fingerprint,
            "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens, "seed": cfg.seed},
            "top_k": cfg.top_k,
            "backend": cfg.backend,
        }
        return source, lineage, record

    def reopen(self, config):
        raise ConfigError("the online OPD data stream runs in a single process", "launch without torchrun (world size 1)")

    def stream(self, trainer) -> OnlineData:
        if trainer.config.parallel.pipeline_parallel != 1:
            raise ConfigError("online OPD runs with pipeline_parallel=1", "set parallel.pipeline_parallel=1")
        student, teacher = self._backends
        self.data = OnlineData(trainer, self.online, self._prompt_ids, student, teacher)
        return self.data


def train_online(config: TrainConfig, online: OnlineConfig):
    """Run (or resume) standard OPD. Returns (the trainer's RunSummary, OnlineStats of this invocation)."""
    from megatron_lopd.training.loop import train
    from megatron_lopd.training.losses import loss_spec

    if not loss_spec(config.loss).distills:
        raise ConfigError(f"online OPD needs a distillation loss, not {config.loss!r}", "use loss=lightning_opd or a top-k loss")
    provider = OnlineOPD(online)
    summary = train(config, provider)
    return summary, provider.data.stats
