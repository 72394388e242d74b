"""Imports every Paddle op-family module so that their handlers register."""

from slimm.convert.paddle import elementwise, nn, reduce, tensor  # noqa: F401
