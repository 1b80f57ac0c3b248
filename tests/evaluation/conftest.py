"""A tiny model that really solves a task, so that evaluation numbers are known in advance.

A random tiny Qwen3 is trained (plain torch, Adam, full batch) on single-digit addition
in chat format: user "a+b", assistant "#c<|end|>". After training it answers all 100
sums correctly under greedy decoding, which the fixture checks with its own greedy loop.
"""

from __future__ import annotations

import json

import pytest
import torch

TRAIN_STEPS = 300
SUMS = [(a, b) for a in range(10) for b in range(10)]


def chat_prompt(tokenizer, a: int, b: int) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{a}+{b}"}], add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def _greedy(model, prompt: list[int], eos: int, max_new: int = 5) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    return ids[len(prompt) :]


@pytest.fixture(scope="session")
def adder_model_dir(tmp_path_factory, char_tokenizer):
    from transformers import AutoModelForCausalLM

    from megatron_lopd.models.tiny import write_random_hf_model

    out = write_random_hf_model(tmp_path_factory.mktemp("adder"), seed=0, init_std=0.02, tokenizer=char_tokenizer)
    tok = char_tokenizer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        rows, masks = [], []
        for a, b in SUMS:
            prompt = chat_prompt(tok, a, b)
            response = tok.encode(f"#{a + b}", add_special_tokens=False) + [tok.eos_token_id]
            rows.append(prompt + response)
            masks.append([0] * len(prompt) + [1] * len(response))
        width = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.bool)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(TRAIN_STEPS):
            logits = model(ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        wrong = [(a, b) for a, b in SUMS if tok.decode(_greedy(model, chat_prompt(tok, a, b), tok.eos_token_id), skip_special_tokens=True) != f"#{a + b}"]
        assert not wrong, f"the adder did not learn {len(wrong)} sums (loss {loss.item():.4f}): {wrong[:5]}"
        model.save_pretrained(str(out), safe_serialization=True)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def adder_data(tmp_path_factory):
    """20 problems: even ones carry the true sum as answer, odd ones a wrong one (sum + 1).

    With max_tokens=3, sums >= 10 need 4 tokens ("#", two digits, EOS) and are cut off.
    """
    rows = []
    for i, (a, b) in enumerate(SUMS[::5]):
        true = a + b
        rows.append({"id": f"p{i:02d}", "problem": f"{a}+{b}", "answer": str(true if i % 2 == 0 else true + 1), "sum": true})
    path = tmp_path_factory.mktemp("adder_data") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows
