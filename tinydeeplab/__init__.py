"""tinydeeplab: DeepLab v2 rebuilt by hand, from the atrous-convolution kernel to the dense CRF.

    import tinydeeplab as tdl
    from tinydeeplab import Tensor, no_grad, gradcheck
    import tinydeeplab.functional as F
"""
import os as _os

from . import _threads  # noqa: F401  first: it must run before NumPy loads OpenBLAS

__version__ = "0.1.0"

# setup.py installs the top-level kernels/ and benchmarks/ folders as tinydeeplab.kernels and
# tinydeeplab.benchmarks.  When Python imports this package straight from a source checkout
# (``python -m pytest`` in the repository root), they sit beside it instead: look there too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and \
        _os.path.isfile(_os.path.join(_root, "kernels", "atrous_conv.py")):
    __path__.append(_root)

from .autograd import Function, Tensor, is_grad_enabled, no_grad  # noqa: E402,F401
from .backend import array_module, has_cuda  # noqa: E402,F401
from .gradcheck import GradcheckError, gradcheck  # noqa: E402,F401
from . import functional  # noqa: E402,F401
