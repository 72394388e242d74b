"""The jax handler table: every op-family module registers into it."""

from slimm.convert.registry import Registry

REGISTRY = Registry("jax")
