"""vocab_parallel_log_probs against an independent float64 full-vocabulary reference.

Tolerances: float32 compute vs float64 reference, logits of scale ~3, V <= 32:
values and gradients within rtol 1e-5 / atol 2e-6 (observed errors are ~1e-7). Token
chunking against one pass: the same float32 arithmetic per position, so rtol 1e-6 /
atol 1e-7 (a row's reduction order may differ with the chunk's shape; observed equal).
"""

import json
import tempfile

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron_lopd.errors import ConfigError
from megatron_lopd.training.vocab_parallel import LOGIT_CHUNKS, VocabShard, vocab_parallel_argmax, vocab_parallel_log_probs
from tests.dist_utils import run_distributed

TOL = dict(rtol=1e-5, atol=2e-6)
CHUNK_TOL = dict(rtol=1e-6, atol=1e-7)


def make_case(seed: int, V: int = 24, vocab_size: int | None = None, B: int = 2, T: int = 5, k: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    real = vocab_size or V
    exclude = torch.stack([torch.randperm(real, generator=g)[:k] for _ in range(B * T)]).view(B, T, k)
    return {
        "logits": torch.randn(B, T, V, generator=g) * 3,
        "ids": torch.randint(0, real, (B, T, 3), generator=g),
        "exclude": exclude,
        "g_ids": torch.randn(B, T, 3, generator=g),  # upstream gradients
        "g_rest": torch.randn(B, T, generator=g),
        "vocab_size": vocab_size,
    }


def reference(case: dict, exclude: bool = True) -> dict:
    """float64, full vocabulary, plain torch: values and d(objective)/d(logits)."""
    logits = case["logits"].double().requires_grad_()
    real = case["vocab_size"] or logits.shape[-1]
    lp = logits[..., :real].log_softmax(-1)
    lp_ids = lp.gather(-1, case["ids"])
    keep = torch.ones_like(lp, dtype=torch.bool)
    if exclude:
        keep.scatter_(-1, case["exclude"], False)
    rest = torch.where(keep, lp, -torch.inf).logsumexp(-1)
    objective = (case["g_ids"] * lp_ids).sum() + (case["g_rest"] * rest).sum()
    (grad,) = torch.autograd.grad(objective, logits)
    return {
        "ids": lp_ids.detach(),
        "rest": rest.detach(),
        "argmax": lp.argmax(-1),
        "entropy": -(lp.exp() * lp).sum(-1).detach(),
        "lse": logits[..., :real].logsumexp(-1).detach(),
        "grad": grad,
    }


def run_local(case: dict, group=None, exclude: bool = True, dtype=torch.float32, chunks: int = LOGIT_CHUNKS) -> dict:
    """This rank's columns only; returns replicated outputs and the local gradient."""
    full = case["logits"].to(dtype)
    world = 1 if group is None else torch.distributed.get_world_size(group)
    rank = 0 if group is None else torch.distributed.get_rank(group)
    local = full.chunk(world, -1)[rank].clone().requires_grad_()
    before = local.detach().clone()
    shard = VocabShard.of(local, group, case["vocab_size"])
    out = vocab_parallel_log_probs(local, case["ids"], shard, case["exclude"] if exclude else None, chunks=chunks)
    ((case["g_ids"] * out.ids).sum() + (case["g_rest"] * out.rest).sum()).backward()
    return {
        "ids": out.ids.detach(), "rest": out.rest.detach(), "argmax": out.argmax, "entropy": out.entropy,
        "lse": out.lse, "grad": local.grad, "untouched": torch.equal(local.detach(), before),
        "argmax_helper": vocab_parallel_argmax(local, shard),
    }


def assert_matches(got: dict, ref: dict, grad=None, tol=TOL) -> None:
    for key in ("ids", "rest", "entropy", "lse"):
        torch.testing.assert_close(got[key].double(), ref[key], **tol, msg=key)
    assert torch.equal(got["argmax"], ref["argmax"]) and torch.equal(got["argmax_helper"], ref["argmax"])
    torch.testing.assert_close((got["grad"] if grad is None else grad).double(), ref["grad"], **tol)


@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("vocab_size", [None, 19])
def test_tp1_matches_float64_reference(exclude, vocab_size):
    case = make_case(0, vocab_size=vocab_size)
    got = run_local(case, exclude=exclude)
    assert_matches(got, reference(case, exclude))
    assert got["untouched"]  # fp32 logits are never modified in place (unlike vocab_parallel_cross_entropy)
    if vocab_size:  # padding columns get no probability and no gradient
        assert torch.all(got["grad"][..., vocab_size:] == 0)
    if not exclude:
        assert torch.all(got["rest"] == 0)


def test_tiny_rest_keeps_relative_precision():
    """Excluded ids holding all but ~1e-9 of the mass: the rest is summed, not 1 - sum."""
    case = make_case(1, V=32, k=4)
    case["logits"] = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5))
    case["logits"].scatter_(-1, case["exclude"], 22.0)
    ref = reference(case)
    assert ref["rest"].max() < -18  # mass outside the excluded ids < 1e-8
    got = run_local(case)
    torch.testing.assert_close(got["rest"].double(), ref["rest"], rtol=0, atol=1e-5)  # 1e-5 relative in mass
    assert_matches(got, ref, tol=dict(rtol=1e-5, atol=1e-5))


def test_empty_rest_ties_bf16_and_bad_ids():
    case = make_case(2, V=8, k=8)  # excluded ids cover the whole vocabulary
    got = run_local(case)
    assert torch.all(got["rest"] == -torch.inf) and torch.isfinite(got["grad"]).all()
    # Ties: the lowest id wins, as torch.argmax does.
    tied = torch.zeros(1, 1, 8)
    tied[..., 3] = tied[..., 6] = 5.0
    assert vocab_parallel_argmax(tied, VocabShard.of(tied)).item() == 3
    # bf16 logits: float32 outputs, bf16 gradient close to the reference of the rounded logits.
    case = make_case(3)
    case["logits"] = case["logits"].bfloat16().float()
    got = run_local(case, dtype=torch.bfloat16)
    assert got["ids"].dtype == torch.float32 and got["grad"].dtype == torch.bfloat16
    assert_matches(got, reference(case), tol=dict(rtol=2e-2, atol=2e-2))
    with pytest.raises(ConfigError, match=r"token ids span \[0, 24\], outside the vocabulary \[0, 24\)"):
        vocab_parallel_log_probs(case["logits"], torch.tensor([[[0, 24]]]), VocabShard.of(case["logits"]))
    with pytest.raises(ConfigError, match="vocab_size 30 does not fit"):
        VocabShard.of(case["logits"], vocab_size=30)


@pytest.mark.parametrize("vocab_size", [None, 19])
def test_token_chunks_give_the_one_pass_results(vocab_size):
    """2 x 5 positions in chunks that divide them or not, and more chunks than positions."""
    case = make_case(8, vocab_size=vocab_size)
    for exclude in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            one_pass = run_local(case, exclude=exclude, dtype=dtype, chunks=1)
            for chunks in (2, 3, 4, 7, 10, 64):
                got = run_local(case, exclude=exclude, dtype=dtype, chunks=chunks)
                for key in ("ids", "rest", "entropy", "lse", "grad"):
                    torch.testing.assert_close(got[key], one_pass[key], **CHUNK_TOL, msg=f"{key}, {chunks} chunks")
                assert torch.equal(got["argmax"], one_pass["argmax"]) and got["untouched"]
    for chunks in (0, 2.5, True):
        with pytest.raises(ConfigError, match=f"logit chunks {chunks!r} must be a positive integer"):
            vocab_parallel_log_probs(case["logits"], case["ids"], VocabShard.of(case["logits"]), chunks=chunks)


def allocation_peak(fn, logits: torch.Tensor) -> int:
    """Most bytes held at once by tensors that `fn` allocates, not counting the logits' gradient once it exists."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as f:
            events = sorted((e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"), key=lambda a: a["Ev Idx"])
    grad_ptr, grad_bytes = logits.grad.data_ptr(), logits.grad.nbytes
    grad_alloc = max(i for i, a in enumerate(events) if a["Addr"] == grad_ptr and a["Bytes"] == grad_bytes)
    live = peak = 0
    for i, a in enumerate(events):
        live += a["Bytes"]
        peak = max(peak, live - (grad_bytes if i >= grad_alloc else 0))
    return peak


def test_token_chunks_bound_the_temporaries():
    """Forward + backward temporaries beyond the logits and their gradient, as multiples of the fp32 logits:
    2.25x in one pass (shifted logits, their exp, a bool mask), 2.25 / LOGIT_CHUNKS in the default chunks
    (plus ~0.04x of per-token index tensors, which are not small next to V = 2048)."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 64, 2048, generator=g)
    ids, exclude = torch.randint(0, 2048, (4, 64, 17), generator=g), torch.randint(0, 2048, (4, 64, 16), generator=g)
    fp32_bytes = logits.numel() * 4
    for dtype in (torch.float32, torch.bfloat16):
        leaf = logits.to(dtype, copy=True).requires_grad_()
        shard = VocabShard.of(leaf)
        for chunks, low, high in ((1, 2.2, 2.4), (LOGIT_CHUNKS, 0.25, 0.35)):

            def forward_backward():
                out = vocab_parallel_log_probs(leaf, ids, shard, exclude, chunks=chunks)
                (out.ids.sum() + out.rest.sum()).backward()

            leaf.grad = None
            ratio = allocation_peak(forward_backward, leaf) / fp32_bytes
            assert low < ratio < high, (dtype, chunks, ratio)


def _tp2_worker(cases: list[dict]) -> list[dict]:
    # A plain gloo group: the module needs only torch.distributed, and skipping the
    # megatron-core import saves seconds per rank (tests/training/test_losses.py runs the
    # losses on megatron's own tensor-parallel group).
    torch.distributed.init_process_group("gloo")
    group = torch.distributed.new_group([0, 1])
    results = [run_local(case, group) for case in cases]
    torch.distributed.destroy_process_group()  # here, so the launcher's teardown imports nothing
    return [to_numpy(r) for r in results]  # tensors would be shared-memory handles of an exited process


def to_numpy(d: dict) -> dict:
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def from_numpy(d: dict) -> dict:
    return {k: torch.from_numpy(v) if hasattr(v, "dtype") else v for k, v in d.items()}


def test_tp2_matches_float64_reference():
    tied = make_case(7)
    tied["logits"][0, 0, 5] = tied["logits"][0, 0, 17] = 50.0  # equal maxima on rank 0 and rank 1
    cases = [
        make_case(4),
        make_case(5, vocab_size=19),  # rank 1 holds 7 real ids + 5 padding columns
        make_case(6, V=16, vocab_size=8, k=3),  # rank 1 holds only padding
        tied,
    ]
    rank0, rank1 = ([from_numpy(r) for r in rank] for rank in run_distributed(_tp2_worker, world_size=2, cases=cases))
    for case, r0, r1 in zip(cases, rank0, rank1):
        for key in ("ids", "rest", "argmax", "entropy", "lse"):  # replicated, bit-identical
            assert torch.equal(r0[key], r1[key]), key
        assert_matches(r0, reference(case), grad=torch.cat([r0["grad"], r1["grad"]], -1))
    assert rank0[3]["argmax"][0, 0].item() == 5
