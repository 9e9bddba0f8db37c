"""The command line (``pyro-backpass``, ``python -m pyro_backpass.cli``): argparse lives here only.

One module per subcommand (:mod:`.demo`, :mod:`.backbone_training`, :mod:`.train`,
:mod:`.parse_folder`), each calling plain library functions; :func:`resolve_device` is the only
place a device is chosen, :mod:`.launch` the only place a process group is started.
"""

from pyro_backpass.cli.commands import build_parser, main
from pyro_backpass.cli.device import resolve_device
from pyro_backpass.cli.parse_folder import merge_parts

__all__ = ["build_parser", "main", "merge_parts", "resolve_device"]
