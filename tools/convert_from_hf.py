"""Same as `lopd convert from-hf ...` (see `--help`)."""

from megatron_lopd.cli import run_tool

if __name__ == "__main__":
    run_tool("convert from-hf")
