"""Warning categories raised by hyperst."""


class HyperSTWarning(UserWarning):
    """Base class of every warning hyperst raises on purpose."""
