"""Constants of the data package, in a module of their own so every data module can import
them without importing the package ``__init__`` (see ``pyro_backpass.data`` for the choice of
``DEFAULT_SIZE``)."""

DEFAULT_SIZE: int = 64
CATEGORIES: tuple[str, ...] = ("airplane", "bird", "boat", "car", "chair")
