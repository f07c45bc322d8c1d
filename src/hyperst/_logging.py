"""Scanpy-style logging for hyperst: one package logger and a verbosity setting."""

from __future__ import annotations

import logging
from enum import IntEnum

__all__ = ["Verbosity", "logger", "settings"]

logger = logging.getLogger("hyperst")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False


class Verbosity(IntEnum):
    """Verbosity levels, as in scanpy: 0 errors, 1 warnings, 2 info, 3 hints, 4 debug."""

    error = 0
    warning = 1
    info = 2
    hint = 3
    debug = 4


_TO_LOGGING = {
    Verbosity.error: logging.ERROR,
    Verbosity.warning: logging.WARNING,
    Verbosity.info: logging.INFO,
    Verbosity.hint: logging.INFO,
    Verbosity.debug: logging.DEBUG,
}


class _Settings:
    """Package settings (``hst.settings``).

    Attributes
    ----------
    verbosity
        How much hyperst logs: ``0`` errors, ``1`` warnings (default), ``2`` info, ``3`` hints,
        ``4`` debug. Accepts an int, a :class:`Verbosity` or its name.
    """

    def __init__(self) -> None:
        self._verbosity = Verbosity.warning
        logger.setLevel(_TO_LOGGING[self._verbosity])

    @property
    def verbosity(self) -> Verbosity:
        """Current verbosity level."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int | str | Verbosity) -> None:
        if isinstance(value, str):
            try:
                level = Verbosity[value]
            except KeyError:
                names = ", ".join(v.name for v in Verbosity)
                raise ValueError(f"verbosity={value!r} is not one of {names}.") from None
        else:
            try:
                level = Verbosity(int(value))
            except ValueError:
                raise ValueError(f"verbosity={value!r} must be between 0 and 4.") from None
        self._verbosity = level
        logger.setLevel(_TO_LOGGING[level])

    def __repr__(self) -> str:
        return f"hyperst settings: verbosity={self._verbosity.name}"


settings = _Settings()
