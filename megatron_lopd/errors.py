"""Errors users see: one line that names the thing, what is wrong and how to fix it.

The `lopd` CLI and the tools print a `LopdError` as a single line and exit non-zero,
never a stack trace from deep inside a library.
"""


class LopdError(Exception):
    """A user-facing error: bad input, bad configuration, an inconsistent artifact."""

    exit_code = 2
    all_ranks = False  # raised identically on every rank of a launch: printed by rank 0 only

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(f"{what} (fix: {fix})" if fix else what)


class ConfigError(LopdError):
    """A configuration that cannot work (does not divide, unknown key, missing value)."""


class ArtifactError(LopdError):
    """A missing, incomplete, corrupted or wrong-schema artifact (store, checkpoint, rollouts)."""


class ConsistencyError(LopdError):
    """Provenance mismatch: wrong teacher, wrong starting checkpoint, different tokenizer."""
