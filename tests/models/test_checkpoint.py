"""HF <-> Megatron conversion: exact round trips, the exported directory, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_lopd.errors import ArtifactError, ConfigError
from megatron_lopd.models.checkpoint import (
    HFWeights,
    convert_from_hf,
    convert_to_hf,
    read_checkpoint_metadata,
)
from megatron_lopd.models.tiny import write_random_hf_model

REPO = Path(__file__).resolve().parents[2]
# The installed `lopd` entry point; where the package is only on PYTHONPATH, the same main().
_ENTRY = Path(sys.executable).with_name("lopd")
LOPD = [str(_ENTRY)] if _ENTRY.exists() else [sys.executable, "-c", "import sys; from megatron_lopd.cli import main; sys.exit(main())"]


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def sharded_hf(tmp_path_factory, char_tokenizer):
    """A dense tiny model saved in several safetensors shards (with an index)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sharded")
    single = write_random_hf_model(root / "single", seed=21, tokenizer=char_tokenizer, num_layers=4)
    model = AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    out = root / "hf"
    model.save_pretrained(out, max_shard_size="60KB")
    char_tokenizer.save_pretrained(out)
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


def test_round_trip_is_exact_through_the_tools(sharded_hf, tmp_path):
    """tools/convert_from_hf.py at TP=2 PP=2, then `lopd convert to-hf` into small shards."""
    from megatron_lopd.cli import main

    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    args = ["--hf-dir", str(sharded_hf), "--out", str(ckpt), "--tp", "2", "--pp", "2"]
    run = subprocess.run([sys.executable, str(REPO / "tools" / "convert_from_hf.py"), *args], capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stderr
    assert main(["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(back), "--max-shard-size", "100KB"]) == 0
    original, exported = _tensors(sharded_hf), _tensors(back)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], v) and exported[k].dtype == v.dtype for k, v in original.items())
    assert json.loads((back / "config.json").read_text()) == json.loads((sharded_hf / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / name).read_bytes() == (sharded_hf / name).read_bytes()
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = sorted(back.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"]) == set(original)
    assert {p.name for p in shards} == set(index["weight_map"].values())
    assert all(p.stat().st_size <= 100_000 + 4096 for p in shards)  # + header
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    meta = read_checkpoint_metadata(ckpt)
    assert (meta["tensor_parallel"], meta["pipeline_parallel"], meta["expert_parallel"]) == (2, 2, 1)
    from megatron_lopd.provenance import model_fingerprint

    assert meta["source"]["model_fingerprint"] == model_fingerprint(sharded_hf)


@pytest.mark.parametrize("tp, ep", [(1, 1), (2, 2)])
def test_moe_tied_round_trip_is_exact(tmp_path, char_tokenizer, tp, ep):
    hf = write_random_hf_model(
        tmp_path / "hf", seed=22, tokenizer=char_tokenizer, moe=True, tie_word_embeddings=True, num_experts=4
    )
    convert_from_hf(hf, tmp_path / "ckpt", tp=tp, ep=ep)
    convert_to_hf(tmp_path / "ckpt", tmp_path / "back")
    original, exported = _tensors(hf), _tensors(tmp_path / "back")
    assert "lm_head.weight" not in exported and exported.keys() == original.keys()
    assert all(torch.equal(exported[k], v) for k, v in original.items())


def test_to_hf_from_a_run_directory_exports_its_newest_checkpoint_with_provenance(tiny_hf_dir, tmp_path, capsys):
    """`lopd convert to-hf --checkpoint RUN`: the step named by RUN/checkpoints/latest, and a manifest."""
    from megatron_lopd.cli import main
    from megatron_lopd.provenance import Manifest, model_fingerprint

    run = tmp_path / "run"
    convert_from_hf(tiny_hf_dir, run / "checkpoints" / "step_0000007")
    (run / "checkpoints" / "latest").write_text("step_0000007\n")
    Manifest(kind="run", inputs={"store": "fp-store"}, extra={"final_step": 7}).write(run)
    assert main(["convert", "to-hf", "--checkpoint", str(run), "--out", str(tmp_path / "a")]) == 0
    exported = _tensors(tmp_path / "a")
    assert exported.keys() == _tensors(tiny_hf_dir).keys()
    assert all(torch.equal(exported[k], v) for k, v in _tensors(tiny_hf_dir).items())
    m = Manifest.read(tmp_path / "a", kind="hf_export")
    assert m.fingerprint == model_fingerprint(tmp_path / "a") and m.params == {"final_step": 7}
    assert m.inputs["checkpoint"] == str(run / "checkpoints" / "step_0000007") and m.inputs["run_inputs"] == {"store": "fp-store"}
    # The checkpoints/ directory itself resolves the same way (no run manifest to copy from).
    assert main(["convert", "to-hf", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "b")]) == 0
    assert _tensors(tmp_path / "b").keys() == exported.keys() and not (tmp_path / "b" / "manifest.json").exists()
    (run / "checkpoints" / "latest").write_text("step_0000009\n")
    assert main(["convert", "to-hf", "--checkpoint", str(run), "--out", str(tmp_path / "c")]) != 0
    assert "names step_0000009, which is missing" in capsys.readouterr().err


def test_export_loads_in_transformers(tiny_hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    convert_from_hf(tiny_hf_dir, tmp_path / "ckpt")
    convert_to_hf(tmp_path / "ckpt", tmp_path / "back")
    ids = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)(ids).logits
    assert torch.equal(got, want)
    text = "<|user|>2+2?"
    assert AutoTokenizer.from_pretrained(tmp_path / "back")(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_hf_dir)(text)["input_ids"]


def test_export_dtype_agrees_with_its_config(tiny_hf_dir, tmp_path):
    """A model trained in fp32 (on CPU) from a base model that ships bf16: the export's tensors are
    the config's dtype by default (not fp32 under a bf16 label), or the one asked for, and
    config.json says what the tensors are."""
    from megatron_lopd.cli import main

    base = tmp_path / "base"
    shutil.copytree(tiny_hf_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16", "dtype": "bfloat16"}))
    convert_from_hf(base, tmp_path / "ckpt")  # fp32 tensors, a config that says bf16
    original = _tensors(base)
    assert {t.dtype for t in original.values()} == {torch.float32}
    for dtype, cli in ((None, []), ("float32", ["--dtype", "float32"]), ("float16", ["--dtype", "float16"])):
        out = tmp_path / f"out-{dtype}"
        assert main(["convert", "to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), *cli]) == 0
        want = getattr(torch, dtype or "bfloat16")
        exported = _tensors(out)
        assert all(exported[k].dtype == want and torch.equal(exported[k], v.to(want)) for k, v in original.items())
        written = json.loads((out / "config.json").read_text())
        assert written["torch_dtype"] == written["dtype"] == (dtype or "bfloat16")  # the base had both keys
        assert {k: v for k, v in written.items() if k not in ("torch_dtype", "dtype")} == {
            k: v for k, v in config.items() if k not in ("torch_dtype", "dtype")}
    with pytest.raises(ConfigError, match="export dtype 'int8' is not one of"):
        convert_to_hf(tmp_path / "ckpt", tmp_path / "bad", dtype="int8")


def test_row_reads_match_full_reads(tiny_hf_dir):
    weights = HFWeights(tiny_hf_dir)
    full = weights.read("model.embed_tokens.weight")
    assert torch.equal(weights.read("model.embed_tokens.weight", (17, 40)), full[17:40])


def test_library_errors_are_specific(tiny_hf_dir, tmp_path):
    convert_from_hf(tiny_hf_dir, tmp_path / "ckpt")
    with pytest.raises(ArtifactError, match="not empty"):
        convert_from_hf(tiny_hf_dir, tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="PP=3 does not divide 2 layers"):
        convert_from_hf(tiny_hf_dir, tmp_path / "other", pp=3)
    data = next((tmp_path / "ckpt").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="truncated"):
        read_checkpoint_metadata(tmp_path / "ckpt")


def _bad_inputs(src: Path, root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (lopd arguments, text the one-line error must contain)."""
    llama = root / "llama"
    shutil.copytree(src, llama)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}))

    sharded = root / "sharded"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(sharded, max_shard_size="60KB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()

    disagreeing = root / "disagreeing"
    convert_from_hf(src, disagreeing)
    meta = json.loads((disagreeing / "lopd_checkpoint.json").read_text())
    meta["hf_config"]["num_hidden_layers"] = 3
    (disagreeing / "lopd_checkpoint.json").write_text(json.dumps(meta))

    no_data = root / "no_data"
    convert_from_hf(src, no_data)
    next(no_data.glob("*.distcp")).unlink()
    out = str(root / "out")
    return {
        "architecture": (["from-hf", "--hf-dir", str(llama), "--out", out], "LlamaForCausalLM"),
        "missing_shard": (["from-hf", "--hf-dir", str(sharded), "--out", out], "model-00002-of-"),
        "tp_heads": (["from-hf", "--hf-dir", str(src), "--out", out, "--tp", "3"], "TP=3 does not divide 4 attention heads"),
        "metadata_disagrees": (["to-hf", "--checkpoint", str(disagreeing), "--out", out], "describes"),
        "missing_data_file": (["to-hf", "--checkpoint", str(no_data), "--out", out], "data file of the dist checkpoint is missing"),
    }


def _check_one_line(name: str, rc: int, stderr: str, needle: str) -> None:
    lines = stderr.strip().splitlines()
    assert rc == 2, (name, stderr)
    assert len(lines) == 1 and lines[0].startswith("lopd convert: error:"), (name, stderr)
    assert needle in lines[0] and "(fix: " in lines[0], (name, lines[0])


def test_bad_input_gives_one_clear_line_via_the_cli(tiny_hf_dir, tmp_path, capsys):
    from megatron_lopd.cli import main

    cases = _bad_inputs(tiny_hf_dir, tmp_path)
    # Two through the installed `lopd` entry point (in parallel: mostly interpreter start-up),
    # the others through the same CLI code in this process.
    external = ("architecture", "metadata_disagrees")
    runs = {
        name: subprocess.Popen([*LOPD, "convert", *cases[name][0]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for name in external
    }
    for name, (args, needle) in cases.items():
        if name not in external:
            capsys.readouterr()
            rc = main(["convert", *args])
            _check_one_line(name, rc, capsys.readouterr().err, needle)
    for name, proc in runs.items():
        _, stderr = proc.communicate(timeout=300)
        _check_one_line(name, proc.returncode, stderr, cases[name][1])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_from_hf_under_torchrun(tiny_hf_dir, tmp_path):
    """Two ranks, no process group: rank 0 converts, rank 1 has nothing to do."""
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
         str(REPO / "tools" / "convert_from_hf.py"), "--hf-dir", str(tiny_hf_dir), "--out", str(tmp_path / "ckpt")],
        capture_output=True, text=True, env=_env(),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert read_checkpoint_metadata(tmp_path / "ckpt")["kind"] == "hf_import"


@pytest.mark.vllm
def test_export_loads_in_vllm(tiny_hf_dir, tmp_path):
    """The exported dir serves in vLLM(-cpu): prompt log-probs match transformers (<= 1e-4)."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams, TokensPrompt

    convert_from_hf(tiny_hf_dir, tmp_path / "ckpt")
    convert_to_hf(tmp_path / "ckpt", tmp_path / "back")
    ids = torch.randint(2, 100, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    llm = LLM(model=str(tmp_path / "back"), dtype="float32", enforce_eager=True, max_model_len=64, seed=0)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    got = torch.tensor([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    want = torch.log_softmax(logits.double(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].float()
    assert (got - want).abs().max() <= 1e-4
