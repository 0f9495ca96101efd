"""phi3v: Phi-3-Vision and Phi-3.5-Vision in plain PyTorch.

    import phi3v
    model = phi3v.load("microsoft/Phi-3.5-vision-instruct")
    print(model.chat("What is in this picture?", images=["photo.jpg"]))
"""

from phi3v.api import Phi3V, load
from phi3v.compat import Phi3VForCausalLM, Phi3VProcessor
from phi3v.errors import Phi3VError
from phi3v.generate import GenerationOptions

__version__ = "0.1.0"
__all__ = ["GenerationOptions", "Phi3V", "Phi3VError", "Phi3VForCausalLM", "Phi3VProcessor", "load", "__version__"]
