"""Scene parsing (paper §3): repeated backward passes that subtract each found object from every
level, posterior modes, top-down queries, completion and baselines. Filled by the parsing issue
(#11); empty for now.
"""

__all__: list[str] = []
