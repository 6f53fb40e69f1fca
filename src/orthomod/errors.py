"""The application's one error base: the CLI turns any :class:`OrthomodError` into one line.

Every message names the problem and the fix; no traceback reaches the user. The library
modules (init, regularizers, modulation, models, diagnostics) raise the built-in ``ValueError``
and ``TypeError``, as ``torch.nn.init`` does.
"""

__all__ = ["OrthomodError"]


class OrthomodError(Exception):
    """Bad input or an unusable file or machine; the message says what to do."""
