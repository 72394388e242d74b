"""Imports every MindSpore op-family module so that their handlers register."""

from slimm.convert.mindspore import elementwise, nn, reduce, tensor  # noqa: F401
