"""Exceptions of the SAR models."""


class InvalidArgumentError(ValueError, TypeError):
    """An option of a SAR model has the wrong type or value.

    Both a ``ValueError`` and a ``TypeError``: a wrong type (``depth='50'``)
    and a wrong value (``depth=20``) are the same user mistake, and callers
    catching either see it.
    """
