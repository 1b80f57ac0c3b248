"""megatron-lopd: Lightning OPD (offline on-policy distillation) on megatron-core.

Importing the package never imports megatron-core, Transformer Engine or vLLM: each
subpackage imports what it needs inside the functions that need it.
"""

__version__ = "0.1.0"
