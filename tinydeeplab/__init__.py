"""tinydeeplab: DeepLab v2 rebuilt by hand, from the atrous-convolution kernel to the dense CRF.

    import tinydeeplab as tdl
    from tinydeeplab import Tensor, no_grad, gradcheck
    import tinydeeplab.functional as F
"""
__version__ = "0.1.0"

from .autograd import Function, Tensor, is_grad_enabled, no_grad  # noqa: F401
from .backend import array_module, has_cuda  # noqa: F401
from .gradcheck import GradcheckError, gradcheck  # noqa: F401
from . import functional  # noqa: F401,E402
