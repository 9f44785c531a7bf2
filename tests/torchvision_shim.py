"""Make an installed torchvision importable beside a CPU-only torch (tests only).

PyPI's torchvision wheels are built against PyPI's CUDA torch: beside the CPU wheel
(torch 2.13.0+cpu, CI's) its compiled extension ``_C.so`` cannot load (it links libtorch_cuda),
torchvision carries on without its C++ ops, and then its own ``_meta_registrations`` calls
``torch.library.register_fake("torchvision::nms")`` unguarded, which raises
``RuntimeError: operator torchvision::nms does not exist``. transformers imports torchvision for
every image processor once the package is installed, so the whole import chain fails.

Defining the two schemas that import needs (nms, qnms) lets it finish. Nothing the tests use
calls them: ``torchvision.transforms.v2.functional`` on tensors is plain torch. With a torch
that matches its torchvision the first import succeeds and this does nothing.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

_LIBRARY = None  # the Library must stay alive: its definitions vanish when it is collected


def import_torchvision():
    """Import torchvision (working around a CPU-only torch); None when it is not installed."""
    global _LIBRARY
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision

        return torchvision
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed, half-run import
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision
