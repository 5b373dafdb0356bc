"""tasd: fast local checkpointing with peer replication and asynchronous saving for PyTorch."""

from tasd.basic import BasicTensorAwareStateDict
from tasd.serialization import add_safe_enums, add_safe_globals, get_safe_globals
from tasd.staging import HostBufferPool, default_pool
from tasd.state_dict import TensorAwareStateDict, TensorPlaceholder

__all__ = [
    "TensorAwareStateDict",
    "TensorPlaceholder",
    "BasicTensorAwareStateDict",
    "HostBufferPool",
    "default_pool",
    "add_safe_globals",
    "add_safe_enums",
    "get_safe_globals",
]
__version__ = "0.1.0"
