"""The command line (``pyro-backpass``, ``python -m pyro_backpass.cli``): argparse lives here only.

One module per subcommand (:mod:`.demo`, :mod:`.train_backbone`), each calling plain library
functions; :func:`resolve_device` is the only place a device is chosen.
"""

from pyro_backpass.cli.device import resolve_device
from pyro_backpass.cli.main import build_parser, main

__all__ = ["build_parser", "main", "resolve_device"]
