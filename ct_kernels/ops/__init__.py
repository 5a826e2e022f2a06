"""Fast backends. Each module holds one op: its Triton kernels, autograd Function and
registration with ``ct_kernels.dispatch``; tests live beside them in tests/."""
from ct_kernels.ops import attention  # noqa: F401
from ct_kernels.ops import recon_loss  # noqa: F401
from ct_kernels.ops import autoencoding_loss  # noqa: F401
from ct_kernels.ops import compress  # noqa: F401
from ct_kernels.ops import decode_attention  # noqa: F401
