"""nasforge: hardware-aware NAS and compression as a Kubeflow pipeline."""

import logging as _logging

__version__ = "0.1.0"

# torchao logs a warning for each optional CUDA kernel library it cannot load on a CPU-only
# machine, and torch warns about torchao's Enum registration; neither concerns a CPU user, and
# they would bury the CLI's one-line errors.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
