"""tensorboardX (TensorBoard's event writer) for a process that holds Jittor: imported with torch hidden."""

from __future__ import annotations

import sys


def import_tensorboardx():
    """tensorboardX, imported with torch hidden: its writer module imports torch when torch is installed (only to
    accept torch tensors), and torch and Jittor in one process have crashed (tests run torch in a worker process).
    Where the user imported torch already, it is imported as it is."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX

        return tensorboardX
    sys.modules["torch"] = None  # `import torch` now raises ImportError, which tensorboardX expects without torch
    try:
        import tensorboardX
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return tensorboardX
