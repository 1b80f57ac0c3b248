"""The transformers backend: the reference implementation of `GenerationBackend` (no extra dependency).

Scoring runs the decoder once per padded batch and applies the LM head only at response
positions (a 150K vocabulary over every prompt position would dominate memory), then
log-softmax in float32 over as many positions at a time as `logsoftmax_bytes` allows, and
`torch.topk` on each. Generation decodes many samples at once with a KV cache; prompts of
any lengths share a batch, left-padded (attention mask, per-row position ids), bounded by
`batch_tokens` of cache. Each sample's randomness is a sequence of uniforms drawn from its
own `torch.Generator`, so a sample depends on its own seed only, not on which other prompts
share its batch (up to the last bits of float32 matmuls of other shapes).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_lopd.errors import ConfigError
from megatron_lopd.artifacts import FINISH_LENGTH, FINISH_STOP
from megatron_lopd.generation.base import (
    ModelInfo,
    Sample,
    SamplingParams,
    ScoredSequence,
    check_lengths,
    raise_non_finite,
    sample_seed,
)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _batches_by_tokens(
    lengths: Sequence[int], budget: int, max_rows: int, new_tokens: Sequence[int] | None = None
) -> list[list[int]]:
    """Indices grouped longest-first so that rows * (longest length + most new tokens) <= budget (one row at least).

    The product is a padded batch's size in tokens: its input when scoring, its KV cache when generating
    (`new_tokens[i]`: the most tokens row i may add)."""
    new_tokens = [0] * len(lengths) if new_tokens is None else new_tokens
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    longest = most_new = 0  # of the last batch
    for i in order:
        grown = max(longest, lengths[i]), max(most_new, new_tokens[i])
        if batches and len(batches[-1]) < max_rows and (len(batches[-1]) + 1) * sum(grown) <= budget:
            batches[-1].append(i)
            longest, most_new = grown
        else:
            batches.append([i])
            longest, most_new = lengths[i], new_tokens[i]
    return batches


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p (the crossing token is kept)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # stable: ties resolved by token id
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return probs * keep


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor | None, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of `logits` [B, V]: argmax when temperature is 0, else the inverse CDF of the
    tempered, top-p filtered distribution at that row's uniform in [0, 1) (float64 [B])."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(torch.softmax(logits / temperature, dim=-1), top_p)
    cdf = probs.double().cumsum(dim=-1)  # float64: no drift over a 150K vocabulary
    # right=True skips zero-probability tokens (their CDF equals their predecessor's); u < 1 keeps it in range.
    picked = torch.searchsorted(cdf, (uniforms.to(cdf) * cdf[:, -1])[:, None], right=True)[:, 0]
    return picked.clamp_(max=logits.shape[-1] - 1)


class HfBackend:
    """`batch_tokens`: padded tokens per batch (scoring: its sequences; generation: its KV cache, longest
    prompt + most new tokens), `max_batch`: rows per batch, `logsoftmax_bytes`: scoring's log-softmax buffers."""

    name = "hf"

    def __init__(
        self,
        info: ModelInfo,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        seed: int = 0,
        device: str | None = None,
        batch_tokens: int = 32768,
        max_batch: int = 512,
        logsoftmax_bytes: int = 512 << 20,
    ):
        from transformers import AutoModelForCausalLM

        self.info = info
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(str(info.path), dtype=_TORCH_DTYPES[dtype]).to(self.device).eval()
        self.max_model_len = min(max_model_len or info.max_position_embeddings, info.max_position_embeddings)
        self.seed = seed
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        # Positions per LM-head call when scoring, so that its [positions, vocab] buffers fit logsoftmax_bytes:
        # float32 logits and log-probs, and the head's own output when the model is not float32.
        head_bytes = 0 if dtype == "float32" else _TORCH_DTYPES[dtype].itemsize
        self.logsoftmax_rows = max(1, logsoftmax_bytes // (info.vocab_size * (4 + 4 + head_bytes)))
        self.engine_version = __import__("transformers").__version__

    # ---------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score(self, prompts: list[list[int]], responses: list[list[int]], top_k: int) -> list[ScoredSequence]:
        check_lengths(prompts, responses, self.max_model_len)
        if not 0 <= top_k <= self.info.vocab_size:
            raise ConfigError(f"top_k={top_k} is outside [0, {self.info.vocab_size}] (the vocabulary)", "use e.g. top_k=16")
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        out: list[ScoredSequence | None] = [None] * len(prompts)
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        for batch in _batches_by_tokens(lengths, self.batch_tokens, self.max_batch):
            width = lengths[batch[0]]
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            rows, cols, targets = [], [], []
            for b, i in enumerate(batch):
                seq = list(prompts[i]) + list(responses[i])
                ids[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = 1
                p, r = len(prompts[i]), len(responses[i])
                # Position P-1+t holds the logits that predict response token t.
                rows.append(torch.full((r,), b))
                cols.append(torch.arange(p - 1, p - 1 + r))
                targets.extend(responses[i])
            hidden = decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            picked = hidden[torch.cat(rows).to(self.device), torch.cat(cols).to(self.device)]
            target = torch.tensor(targets, device=self.device)
            token_lp, top_ids, top_lp = [], [], []
            for s in range(0, len(target), self.logsoftmax_rows):
                chunk = slice(s, s + self.logsoftmax_rows)
                logp = torch.log_softmax(head(picked[chunk]).float(), dim=-1)
                token_lp.append(logp.gather(1, target[chunk, None])[:, 0])
                if top_k:
                    vals, idx = logp.topk(top_k, dim=-1)
                    top_lp.append(vals)
                    top_ids.append(idx)
            token_lp_np = torch.cat(token_lp).cpu().numpy().astype(np.float32)
            top_ids_np = torch.cat(top_ids).cpu().numpy().astype(np.int32) if top_k else None
            top_lp_np = torch.cat(top_lp).cpu().numpy().astype(np.float32) if top_k else None
            start = 0
            for i in batch:
                r = len(responses[i])
                sl = slice(start, start + r)
                out[i] = ScoredSequence(
                    token_logprobs=token_lp_np[sl],
                    topk_ids=None if top_ids_np is None else top_ids_np[sl],
                    topk_logprobs=None if top_lp_np is None else top_lp_np[sl],
                )
                start += r
        return out  # type: ignore[return-value]

    # ---------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, prompt_indices: Sequence[int] | None = None
    ) -> list[list[Sample]]:
        check_lengths(prompts, None, self.max_model_len, what="prompt")
        indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
        if len(indices) != len(prompts):
            raise ConfigError(f"prompt_indices has {len(indices)} entries for {len(prompts)} prompts", "pass one global index per prompt")
        # One row per sample. Rows of any prompt lengths share a batch (left-padded); the longest-first
        # order keeps the padding small. A row may add up to max_tokens, or what the context leaves.
        rows = [(p, j) for p in range(len(prompts)) for j in range(params.n)]
        prompt_lengths = [len(prompts[p]) for p, _ in rows]
        limits = [min(params.max_tokens, self.max_model_len - n) for n in prompt_lengths]
        samples: list[Sample | None] = [None] * len(rows)
        for batch in _batches_by_tokens(prompt_lengths, self.batch_tokens, self.max_batch, new_tokens=limits):
            seeds = [sample_seed(params.seed, indices[rows[r][0]], rows[r][1]) for r in batch]
            decoded = self._decode([prompts[rows[r][0]] for r in batch], seeds, [limits[r] for r in batch], params)
            for r, sample in zip(batch, decoded):
                samples[r] = sample
        return [samples[p * params.n : (p + 1) * params.n] for p in range(len(prompts))]  # type: ignore[misc]

    def _decode(self, prompts: list[list[int]], seeds: list[int], limits: list[int], params: SamplingParams) -> list[Sample]:
        """KV-cached decoding of prompts of any lengths, left-padded, up to `limits[b]` tokens for row b, every step batched."""
        dev, rows, steps = self.device, len(prompts), max(limits)
        width = max(len(p) for p in prompts)
        stop = torch.tensor(sorted(set(self.info.eos_token_ids) | set(params.stop_token_ids)), dtype=torch.long, device=dev)
        ids = torch.zeros(rows, width, dtype=torch.long)  # the padding's id is irrelevant: it is masked out
        attention = torch.ones(rows, width + steps, dtype=torch.long)  # per output row: 0 on its left padding
        for b, prompt in enumerate(prompts):
            ids[b, width - len(prompt) :] = torch.tensor(prompt)
            attention[b, : width - len(prompt)] = 0
        ids, attention = ids.to(dev), attention.to(dev)
        prompt_lengths = torch.tensor([len(p) for p in prompts], device=dev)
        # Each row's randomness, drawn up front from its own generator: one uniform per step (inverse-CDF sampling).
        uniforms = None
        if params.temperature != 0:
            uniforms = torch.zeros(rows, steps, dtype=torch.float64)
            for b, (seed, count) in enumerate(zip(seeds, limits)):
                uniforms[b, :count] = torch.rand(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            uniforms = uniforms.to(dev)
        limit = torch.tensor(limits, device=dev)
        tokens = torch.zeros(rows, steps, dtype=torch.long, device=dev)
        logprobs = torch.zeros(rows, steps, dtype=torch.float32, device=dev)
        lengths = limit.clone()
        stopped = torch.zeros(rows, dtype=torch.bool, device=dev)
        held = torch.arange(rows, device=dev)  # the output row of each cache row
        alive = torch.ones(rows, dtype=torch.bool, device=dev)  # per cache row: still generating
        positions = (attention[:, :width].cumsum(-1) - 1).clamp_(min=0)  # a row's first real token is at position 0
        out = self.model(input_ids=ids, attention_mask=attention[:, :width], position_ids=positions, use_cache=True, logits_to_keep=1)
        for t in range(steps):
            logits = out.logits[:, -1].float()
            if not bool(torch.isfinite(logits[alive]).all()):  # NaN weights: refuse, never sample garbage
                raise_non_finite(self.info, "hf")
            chosen = sample_tokens(logits, None if uniforms is None else uniforms[held, t], params.temperature, params.top_p)
            tokens[held[alive], t] = chosen[alive]
            if params.record_logprobs:  # raw: temperature 1, full vocabulary
                logprobs[held[alive], t] = torch.log_softmax(logits[alive], dim=-1).gather(1, chosen[alive, None])[:, 0]
            ended = alive & torch.isin(chosen, stop)
            lengths[held[ended]] = t + 1
            stopped[held[ended]] = True
            alive &= ~ended & (limit[held] > t + 1)
            num_alive = int(alive.sum())
            if num_alive == 0:
                break
            if num_alive <= 0.75 * len(alive):  # finished rows are a quarter of the cache: drop them (geometric copy cost)
                keep = alive.nonzero()[:, 0]
                out.past_key_values.reorder_cache(keep)
                held, alive, chosen = held[keep], alive[keep], chosen[keep]
            # The token chosen at step t sits at position prompt length + t of its row.
            out = self.model(input_ids=chosen[:, None], attention_mask=attention[held, : width + t + 1],
                             position_ids=(prompt_lengths[held] + t)[:, None], past_key_values=out.past_key_values, use_cache=True)
        tokens, logprobs, lengths, stopped = tokens.cpu(), logprobs.cpu(), lengths.tolist(), stopped.tolist()
        return [
            Sample(
                response_ids=tokens[b, : lengths[b]].tolist(),
                finish_reason=FINISH_STOP if stopped[b] else FINISH_LENGTH,
                logprobs=logprobs[b, : lengths[b]].tolist() if params.record_logprobs else None,
            )
            for b in range(rows)
        ]

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
