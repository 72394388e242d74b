"""ONNX -> JAX: `forward(params, *inputs)` functions saved with jax.export (serialized StableHLO with
symbolic shapes), weights beside them as safetensors."""
