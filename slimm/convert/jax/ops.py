"""Imports every JAX op-family module so that their handlers register."""

from slimm.convert.jax import elementwise, nn, reduce, tensor  # noqa: F401
