"""The transformers backend: the reference implementation of `GenerationBackend` (no extra dependency).

Scoring runs the decoder once per padded batch and applies the LM head only at response
positions (a 150K vocabulary over every prompt position would dominate memory), then
log-softmax in float32 and one `torch.topk` per batch. Generation is a plain KV-cached
sampling loop with one `torch.Generator` per sample, so each sample depends on its own
seed only, not on which other prompts share its batch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_lopd.errors import ConfigError
from megatron_lopd.generation.base import (
    FINISH_LENGTH,
    FINISH_STOP,
    ModelInfo,
    Sample,
    SamplingParams,
    ScoredSequence,
    check_lengths,
    sample_seed,
)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _batches_by_tokens(lengths: Sequence[int], budget: int, max_rows: int) -> list[list[int]]:
    """Indices grouped longest-first so that rows * padded length <= budget (one row at least)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_rows and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p (the crossing token is kept)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return probs * keep


class HfBackend:
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
        max_batch: int = 64,
        logits_chunk: int = 8192,
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
        self.logits_chunk = logits_chunk  # positions per LM-head call: bounds the [positions, vocab] float32 buffer
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
            for s in range(0, len(target), self.logits_chunk):
                logp = torch.log_softmax(head(picked[s : s + self.logits_chunk]).float(), dim=-1)
                token_lp.append(logp.gather(1, target[s : s + self.logits_chunk, None])[:, 0])
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
        indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        rows = [(p, j) for p in range(len(prompts)) for j in range(params.n)]
        samples: dict[tuple[int, int], Sample] = {}
        for s in range(0, len(rows), self.max_batch):
            chunk = rows[s : s + self.max_batch]
            seeds = [sample_seed(params.seed, indices[p], j) for p, j in chunk]
            for key, sample in zip(chunk, self._generate_rows([prompts[p] for p, _ in chunk], seeds, params)):
                samples[key] = sample
        return [[samples[(p, j)] for j in range(params.n)] for p in range(len(prompts))]

    def _generate_rows(self, prompts: list[list[int]], seeds: list[int], params: SamplingParams) -> list[Sample]:
        dev, B = self.device, len(prompts)
        stop = torch.tensor(sorted(set(self.info.eos_token_ids) | set(params.stop_token_ids)), device=dev, dtype=torch.long)
        width = max(map(len, prompts))
        ids = torch.zeros(B, width, dtype=torch.long)
        mask = torch.zeros(B, width, dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: every row's next token lands in the last column
            ids[b, width - len(p) :] = torch.tensor(p)
            mask[b, width - len(p) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        budget = [min(params.max_tokens, self.max_model_len - len(p)) for p in prompts]
        gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, next_pos = out.past_key_values, positions[:, -1:] + 1
        tokens: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list[float]] = [[] for _ in range(B)]
        finish: list[str | None] = [None] * B
        logits = out.logits[:, -1, :].float()
        for _step in range(max(budget)):
            raw = torch.log_softmax(logits, dim=-1)
            chosen = torch.zeros(B, dtype=torch.long, device=dev)
            for b in range(B):
                if finish[b] is not None:
                    continue
                if params.temperature == 0:
                    chosen[b] = int(torch.argmax(logits[b]))
                else:
                    probs = top_p_filter(torch.softmax(logits[b] / params.temperature, dim=-1), params.top_p)
                    chosen[b] = int(torch.multinomial(probs, 1, generator=gens[b]))
                tok = int(chosen[b])
                tokens[b].append(tok)
                logprobs[b].append(float(raw[b, tok]))
                if bool((stop == tok).any()):
                    finish[b] = FINISH_STOP
                elif len(tokens[b]) >= budget[b]:
                    finish[b] = FINISH_LENGTH
            if all(f is not None for f in finish):
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)
            out = self.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache, use_cache=True)
            cache, next_pos = out.past_key_values, next_pos + 1
            logits = out.logits[:, -1, :].float()
        return [
            Sample(response_ids=tokens[b], finish_reason=finish[b] or FINISH_LENGTH, logprobs=logprobs[b] if params.record_logprobs else None)
            for b in range(B)
        ]

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
