"""The one error base class of attnbench.

It lives outside the other packages because every one of them raises it:
``attentions`` must not import ``bench``, and ``reports`` must not import
``attentions`` (it would pull in torch). This module imports nothing.
"""

from __future__ import annotations


class AttnbenchError(Exception):
    """A request that cannot be served as given; the message says what to change.

    The CLI prints it on one line and exits with status 2, without a traceback.
    Subclasses may also derive from ``ValueError`` or ``KeyError`` so that callers
    catching those keep working.
    """


class UnknownName(AttnbenchError, KeyError):
    """A name (mechanism, preset, model) that is not registered; the message lists the valid ones."""

    def __str__(self) -> str:
        # KeyError quotes its argument; this message is meant for people.
        return str(self.args[0]) if self.args else ""
