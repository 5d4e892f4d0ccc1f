"""``python -m attnbench``: the same app as the ``attnbench`` console script."""

from attnbench.cli import app

app()
