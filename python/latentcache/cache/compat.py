"""The deprecated spellings of the cache API, each accepted for one more release with a DeprecationWarning."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["keywords_were_positional", "renamed"]

_F = TypeVar("_F", bound=Callable[..., Any])


def renamed(func: str, old: str, new: str, old_value: Any, new_value: Any, stacklevel: int = 3) -> Any:
    """The value of keyword ``new``, taking it from its deprecated name ``old`` (with a
    ``DeprecationWarning`` pointed ``stacklevel`` frames up) when only that was given. Both given is
    a ``TypeError``."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"{func}() got both {new}= and its deprecated name {old}=; pass only {new}=")
    warnings.warn(
        f"{func}(): the keyword {old}= is deprecated and will be removed; pass {new}= instead",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return old_value


def keywords_were_positional(positional: int, *names: str) -> Callable[[_F], _F]:
    """Let a function whose ``names`` became keyword-only still take them in their old positions
    (after its first ``positional`` arguments), with a ``DeprecationWarning``. The signature seen by
    ``help``, ``inspect`` and type checkers is the new one."""

    def decorate(func: _F) -> _F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if len(args) > positional:
                extra = args[positional:]
                if len(extra) > len(names):
                    raise TypeError(
                        f"{func.__name__}() takes {positional} positional arguments "
                        f"but {len(args)} were given"
                    )
                for name, value in zip(names, extra, strict=False):
                    if name in kwargs:
                        raise TypeError(f"{func.__name__}() got multiple values for argument {name!r}")
                    kwargs[name] = value
                given = ", ".join(f"{n}=" for n in names[: len(extra)])
                warnings.warn(
                    f"{func.__name__}(): passing {given} by position is deprecated; pass it by keyword",
                    DeprecationWarning,
                    stacklevel=2,
                )
                args = args[:positional]
            return func(*args, **kwargs)

        return cast(_F, wrapper)

    return decorate
