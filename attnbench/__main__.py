"""``python -m attnbench``: the same entry as the ``attnbench`` console script."""

from attnbench.cli import entry

entry()
