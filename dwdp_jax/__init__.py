"""dwdp_jax: Distributed Weight Data Parallelism for DeepSeek-V3/R1 MoE inference in JAX."""

from dwdp_jax.config import ConfigError, ModelConfig, from_hf_json, preset
from dwdp_jax.model import DeepseekV3, init_model
from dwdp_jax.safetensors_io import CheckpointError
from dwdp_jax.weights import load_model

__all__ = [
    "CheckpointError", "ConfigError", "DeepseekV3", "ModelConfig", "from_hf_json", "init_model", "load_model", "preset",
]
