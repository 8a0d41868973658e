"""dwdp_jax: Distributed Weight Data Parallelism for DeepSeek-V3/R1 MoE inference in JAX.

The names below (and the submodules) load on first use, so that a command can start work before JAX's import
(~1.5 s): `dwdp-convert` hashes the source meanwhile.
"""

import importlib

_EXPORTS = {
    "CheckpointError": "safetensors_io", "ConfigError": "config", "DeepseekV3": "model", "ModelConfig": "config",
    "from_hf_json": "config", "init_model": "model", "load_model": "weights", "preset": "config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = f"{__name__}.{_EXPORTS.get(name, name)}"
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return getattr(loaded, name) if name in _EXPORTS else loaded
