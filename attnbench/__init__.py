"""attnbench: one import root for the whole project.

Installed, the subpackages ``attnbench.attentions``, ``attnbench.bench``,
``attnbench.models``, ``attnbench.reports`` and ``attnbench.cli`` live under this
package (pyproject.toml maps the repository's top-level folders into it). Run from
a checkout without installing (``PYTHONPATH=.``, as ``scripts/gpu_run.sh`` does),
the same folders are found beside this one: the package's search path is extended
to the repository root, and only there.

This module itself holds what every package shares and that depends on nothing:
the error base class.
"""

from pathlib import Path

from attnbench.errors import AttnbenchError, UnknownName

_ROOT = Path(__file__).resolve().parent.parent
# A checkout, not an installed copy: the subpackages are the repository's top-level folders.
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "attentions" / "__init__.py").is_file():
    __path__.append(str(_ROOT))  # noqa: F821 (a package's __path__)

__all__ = ["AttnbenchError", "UnknownName"]
