"""vocab_parallel_log_probs against an independent float64 full-vocabulary reference.

Tolerances: float32 compute vs float64 reference, logits of scale ~3, V <= 32:
values and gradients within rtol 1e-5 / atol 2e-6 (observed errors are ~1e-7).
"""

import pytest
import torch

from megatron_lopd.errors import ConfigError
from megatron_lopd.training.vocab_parallel import VocabShard, vocab_parallel_argmax, vocab_parallel_log_probs
from tests.dist_utils import run_distributed

TOL = dict(rtol=1e-5, atol=2e-6)


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


def run_local(case: dict, group=None, exclude: bool = True, dtype=torch.float32) -> dict:
    """This rank's columns only; returns replicated outputs and the local gradient."""
    full = case["logits"].to(dtype)
    world = 1 if group is None else torch.distributed.get_world_size(group)
    rank = 0 if group is None else torch.distributed.get_rank(group)
    local = full.chunk(world, -1)[rank].clone().requires_grad_()
    before = local.detach().clone()
    shard = VocabShard.of(local, group, case["vocab_size"])
    out = vocab_parallel_log_probs(local, case["ids"], shard, case["exclude"] if exclude else None)
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
