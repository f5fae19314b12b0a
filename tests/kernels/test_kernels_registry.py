"""``import ditfx.kernels`` registers every op and exposes it in ``KERNELS``."""

import torch

import ditfx.kernels
from ditfx.kernels.testing import VARIANTS


def test_every_kernel_is_a_registered_op():
    assert set(ditfx.kernels.KERNELS) == set(VARIANTS)
    for name in ditfx.kernels.KERNELS:
        assert hasattr(torch.ops.ditfx, name), name


def test_public_functions_dispatch_to_the_ops():
    # The public functions call torch.ops.ditfx.<name>, so the op is visible to dispatch modes.
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    for name, fn in ditfx.kernels.KERNELS.items():
        seen = []
        args = ditfx.kernels.testing.make_inputs(name, VARIANTS[name][0], 1, 2, 8, torch.float32)
        with Record():
            fn(*args)
        assert getattr(torch.ops.ditfx, name).default in seen, name
