"""Pieces every package of attnbench shares and that depend on nothing: the error base class.

``attentions`` (torch), ``bench``, ``models`` and ``reports`` (torch-free) all
raise subclasses of :class:`AttnbenchError`; the CLI catches that one class.
"""

from attnbench.errors import AttnbenchError, UnknownName

__all__ = ["AttnbenchError", "UnknownName"]
