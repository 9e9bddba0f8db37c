"""Learning (paper §2.3): fitting the observation model and the top-down mixtures by hard EM,
resumable training and checkpoints. Filled by the learning issue (#9); empty for now.
"""

__all__: list[str] = []
