"""nemo-run recipes: `python -m recipes.lightning_opd --factory qwen3_8b run.executor=slurm ... --yes`."""
