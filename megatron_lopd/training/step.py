"""One optimizer step in megatron-core's schedule contract: `TrainStep(batch) -> record`.

`forward_step(data_iterator, model)` returns the logits and a loss function; megatron-core's
`get_forward_backward_func()` runs it over the step's micro-batches through the pipeline
schedule. The loss contributions are already globally normalised (mean over each sequence's
response tokens, then over the global batch: `losses.compute_loss`), so Megatron is told not
to rescale them: the loss function returns a token count of 0 with
`calculate_per_token_loss=True` (no division by the number of micro-batches) and DDP sums
gradients over data-parallel ranks instead of averaging them (`average_in_collective=False`).
The metric sums of all micro-batches and DP ranks are all-reduced once per step. A step whose
loss or gradient is NaN/inf makes no update; the record says `skipped`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from megatron_lopd.training.losses import TOKEN_MEANS, LossOptions, compute_loss

SUM_KEYS = ("loss", "tokens", "sequences", "teacher_nonfinite", *TOKEN_MEANS.values())


@dataclass
class TrainStep:
    config: Any  # TrainConfig
    model: Any  # DDP-wrapped megatron-core GPTModel
    optimizer: Any
    scheduler: Any
    device: torch.device
    tp_group: Any  # None without tensor parallelism
    vocab_size: int
    use_te: bool
    is_last_stage: bool
    flops_per_token: Callable[[int], float]  # training FLOPs per token of a sequence of that length
    peak_tflops: float | None = None  # per GPU; None: no MFU (CPU, unknown device)
    # The stop signal this rank got so far (0: none), read when the step ends so that a signal
    # arriving mid-step stops the run after this step; agreed across ranks.
    stop_signal: Callable[[], int] = lambda: 0

    def forward_step(self, data_iterator, model):
        from megatron_lopd.training.data import block_causal_mask, packed_seq_params

        mb = next(data_iterator).to(self.device, non_blocking=True)
        mask = packed = None
        if self.config.data.pack:  # packed sequences never attend to each other
            packed, mask = (packed_seq_params(mb.seq_ids), None) if self.use_te else (None, block_causal_mask(mb.seq_ids))
        logits = model(mb.input_ids, mb.position_ids, mask, packed_seq_params=packed)
        options = LossOptions(advantage_clip=self.config.advantage_clip or None, reduction=self.config.loss_reduction, vocab_size=self.vocab_size)
        no_rescaling = torch.zeros([], dtype=torch.int, device=self.device)

        def loss_func(output):
            loss, sums = compute_loss(self.config.loss, output, mb.loss_inputs(), tp_group=self.tp_group, options=options)
            sums = {k: v.detach() for k, v in sums.items()}
            sums["loss"] = loss.detach().float()
            return loss, no_rescaling, sums

        return logits, loss_func

    def reduce(self, per_microbatch: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Sum the metric sums over micro-batches and DP ranks (one all-reduce for all of them)."""
        from megatron.core import parallel_state as ps

        vec = torch.zeros(len(SUM_KEYS), dtype=torch.float64, device=self.device)
        present = torch.zeros(len(SUM_KEYS), dtype=torch.float64, device=self.device)
        if self.is_last_stage and ps.get_tensor_model_parallel_rank() == 0:
            for sums in per_microbatch:
                for i, key in enumerate(SUM_KEYS):
                    if key in sums:
                        vec[i] += sums[key].double()
                        present[i] = 1
        both = torch.stack([vec, present])
        torch.distributed.all_reduce(both)
        return {k: v for k, v, p in zip(SUM_KEYS, both[0].tolist(), both[1].tolist()) if p > 0}

    def __call__(self, batch, step: int) -> dict[str, Any]:
        """Train on one StepBatch; returns the step's metrics record (`step`: 1-based)."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t0 = time.perf_counter()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=self.forward_step, data_iterator=iter(batch.micro_batches), model=[self.model],
            num_microbatches=len(batch.micro_batches), seq_length=batch.row_length,
            micro_batch_size=batch.micro_batches[0].input_ids.shape[0], forward_only=False,
        )
        sums = self.reduce(outputs)
        loss = sums.get("loss", float("nan"))
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        lr = None
        if finite:
            self.scheduler.step(1)  # the lr of this update (see Trainer.build_optimizer)
            groups = self.optimizer.param_groups
            lr = float(groups[0]["lr"]) if groups else self.config.optimizer.lr
            finite = bool(self.optimizer.step()[0])
        if self.device.type == "cuda":  # the optimizer's kernels are queued: the step ends when they ran
            torch.cuda.synchronize(self.device)
        # Every rank measures its own time (data wait included); the slowest defines the step.
        # The same all-reduce tells every rank whether any of them got a stop signal.
        agreed = torch.tensor([time.perf_counter() - t0 + batch.wait_s, float(self.stop_signal())], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        step_time, agreed_signal = float(agreed[0].item()), int(agreed[1].item())
        # Attention FLOPs grow with each packed sequence's own length, not the row's.
        flops = sum(n * self.flops_per_token(n) for n in batch.sequence_tokens)
        totals = torch.tensor([batch.tokens, flops], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(totals, group=ps.get_data_parallel_group())
        tokens, flops = int(totals[0].item()), float(totals[1].item())
        tokens_per_s = tokens / step_time if step_time > 0 else 0.0
        n_tok = sums.get("tokens", 0.0)
        mfu = None
        if self.peak_tflops is not None:
            from megatron_lopd.training.metrics_log import mfu as model_flops_utilisation

            mfu = model_flops_utilisation(flops / step_time if step_time > 0 else 0.0, torch.distributed.get_world_size(), self.peak_tflops)
        return {
            "step": step,
            "loss": loss,
            **{name: (sums[key] / n_tok if key in sums and n_tok > 0 else None) for name, key in TOKEN_MEANS.items()},
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": tokens,
            "loss_tokens": int(n_tok),
            "sequences": self.config.data.global_batch,
            "tokens_per_s": tokens_per_s,
            "step_time_s": step_time,
            "mfu": mfu,
            "skipped": not finite,
            "teacher_nonfinite": int(sums.get("teacher_nonfinite", 0)),
            "stop_signal": agreed_signal,
        }
