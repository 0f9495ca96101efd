"""phi3v: Phi-3-Vision and Phi-3.5-Vision in plain PyTorch."""

from phi3v.errors import Phi3VError

__version__ = "0.1.0"
__all__ = ["Phi3VError", "__version__"]
