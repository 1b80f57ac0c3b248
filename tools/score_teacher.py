"""Score a rollout artifact with the teacher into a teacher store (== `lopd score`)."""

from megatron_lopd.cli import run_tool

if __name__ == "__main__":
    run_tool("score")
