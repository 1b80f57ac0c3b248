"""Evaluate a Hugging Face model on a JSONL problem set: `python tools/evaluate.py ARGS` == `lopd eval ARGS`."""

from megatron_lopd.cli import run_tool

if __name__ == "__main__":
    run_tool("eval")
