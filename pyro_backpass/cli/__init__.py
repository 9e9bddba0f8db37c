"""The command line (``pyro-backpass``, ``python -m pyro_backpass.cli``): argparse lives here only.

One module per subcommand (:mod:`.demo`, :mod:`.backbone_training`, :mod:`.train`), each
calling plain library functions; :func:`resolve_device` is the only place a device is chosen.
"""

from pyro_backpass.cli.commands import build_parser, main
from pyro_backpass.cli.device import resolve_device

__all__ = ["build_parser", "main", "resolve_device"]
