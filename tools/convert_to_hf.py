"""Same as `lopd convert to-hf ...` (see `--help`)."""

from megatron_lopd.cli import run_tool

if __name__ == "__main__":
    run_tool("convert to-hf")
