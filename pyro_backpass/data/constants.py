"""Constants of the data package, in a module of their own so every data module can import
them without importing the package ``__init__`` (see ``pyro_backpass.data`` for the choice of
``DEFAULT_SIZE``)."""

DEFAULT_SIZE: int = 64
CATEGORIES: tuple[str, ...] = ("airplane", "bird", "boat", "car", "chair")

# Seeds of the data splits, defined once: a split's seed is ``seed + SPLIT_SEED_OFFSETS[split]``.
# ``train`` data train models, every threshold and choice is tuned on ``validation``, and the
# benchmarks report on ``test`` only. (The backbone's held-out set uses its own offset,
# ``backbone.train.HELD_OUT_SEED_OFFSET``.)
SPLIT_SEED_OFFSETS: dict[str, int] = {"train": 0, "validation": 2_000_003, "test": 3_000_017}


def split_seed(split: str, seed: int = 0) -> int:
    """The seed of ``split`` (``train``, ``validation``, ``test``) for a base ``seed``."""
    if split not in SPLIT_SEED_OFFSETS:
        raise ValueError(f"unknown split {split!r}; splits: {list(SPLIT_SEED_OFFSETS)}")
    return int(seed) + SPLIT_SEED_OFFSETS[split]
