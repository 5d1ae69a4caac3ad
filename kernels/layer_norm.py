"""Triton layer_norm kernel (placeholder until the kernel lands)."""


def layer_norm(*args, **kwargs):
    raise NotImplementedError("the Triton layer_norm kernel has not been written yet")
