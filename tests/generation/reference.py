"""Independent references for the generation tests: plain transformers forwards in float64.

One unpadded sequence at a time, the full model (not the decoder/head split the hf
backend uses), log-softmax in float64: nothing shared with the code under test.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=4)
def _model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


@torch.inference_mode()
def full_logprobs(model_dir, prompt_ids, response_ids) -> np.ndarray:
    """float64 [R, V]: log p(. | prompt, response[:t]) for every response position t."""
    seq = torch.tensor([list(map(int, prompt_ids)) + list(map(int, response_ids))])
    logits = _model(str(model_dir))(input_ids=seq).logits[0]
    p = len(prompt_ids)
    return torch.log_softmax(logits[p - 1 : p - 1 + len(response_ids)], dim=-1).numpy()


@torch.inference_mode()
def next_token_logprobs(model_dir, context_ids) -> np.ndarray:
    """float64 [V]: log p(. | context), from a forward over the context alone (the definition of entry t)."""
    logits = _model(str(model_dir))(input_ids=torch.tensor([list(map(int, context_ids))])).logits[0, -1]
    return torch.log_softmax(logits, dim=-1).numpy()


def token_logprobs(full: np.ndarray, response_ids) -> np.ndarray:
    return full[np.arange(len(response_ids)), np.asarray(response_ids, dtype=np.int64)]


def assert_topk_matches(ref_full: np.ndarray, topk_ids: np.ndarray, topk_lp: np.ndarray, *, atol: float, rtol: float = 0.0, tie_eps: float = 1e-5):
    """Top-k ids equal the reference's top-k as sets (positions whose k-th and (k+1)-th reference
    log-probs are within tie_eps are skipped: a tie), log-probs within tolerance, sorted descending."""
    k = topk_ids.shape[1]
    order = np.argsort(-ref_full, axis=-1, kind="stable")
    for t in range(len(ref_full)):
        srt = ref_full[t, order[t]]
        if k < ref_full.shape[1] and srt[k - 1] - srt[k] < tie_eps:
            continue
        assert set(topk_ids[t].tolist()) == set(order[t, :k].tolist()), f"position {t}: top-{k} ids differ"
    np.testing.assert_allclose(topk_lp, np.take_along_axis(ref_full, topk_ids.astype(np.int64), -1), atol=atol, rtol=rtol)
    assert np.all(np.diff(topk_lp, axis=1) <= 1e-6), "top-k not sorted by log-prob descending"
