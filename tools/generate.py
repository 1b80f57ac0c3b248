"""Sample responses to a prompt file into a rollout artifact (== `lopd generate`)."""

from megatron_lopd.cli import run_tool

if __name__ == "__main__":
    run_tool("generate")
