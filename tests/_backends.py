"""The backend database of the test suite (as torch's OptimizerInfo for optimizers): which
backends run here, and for which kind of test. Tests iterate over these x ``methods.names()``."""
import torch

from mmmod import backends

_ORDER = ("torch", "cpu", "triton", "cuda")


def device_for(backend: str) -> torch.device:
    """Where a backend's test tensors live."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


#: every backend that can run on this machine (triton on CPU only under TRITON_INTERPRET=1)
LIVE_BACKENDS = [b for b in _ORDER if backends.status(b)[0]
                 and backends._load(b).supports(device_for(b))]
#: backends fast enough for whole training loops on the host (no interpreter)
HOST_BACKENDS = [b for b in ("torch", "cpu") if backends.status(b)[0]]
