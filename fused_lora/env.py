"""The package's environment variables, parsed one way (standard library only: the package's
``__init__`` and the Triton kernels' config helpers read them before torch is imported).

* switches (``env_flag``): ``1/true/yes/on`` and ``0/false/no/off``, in any case and with
  surrounding spaces; unset or empty means the default; anything else is a ValueError naming
  the variable. Triton reads ``TRITON_INTERPRET`` as true for the same true words (and also
  ``y``, which is an error here rather than a silent disagreement).
* choices (``env_choice``): one of a few lower-case words, in any case; unset or empty means the
  default; anything else is a ValueError naming the variable and the choices.

Every variable is read when it is used (not cached at import), so a test or a user may set it
at run time; what reads it once says so where it does.
"""

from __future__ import annotations

import os

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _value(name: str) -> str | None:
    """The variable's value, stripped and lower-cased; None when unset or empty."""
    value = os.environ.get(name)
    if value is None:
        return None
    value = value.strip().lower()
    return value or None


def env_flag(name: str, default: bool = False, extra: tuple[str, ...] = ()) -> bool | str:
    """The switch ``name``: True or False (``default`` when unset or empty).

    ``extra``: further accepted words (lower case), returned as they are (e.g.
    ``FUSED_LORA_AUTOTUNE=compile``).
    """
    raw = os.environ.get(name)
    if raw is None:  # NOTE: the common cases first: some switches are read on every kernel launch
        return default
    if raw == "1":
        return True
    if raw == "0":
        return False
    value = _value(name)
    if value is None:
        return default
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    if value in extra:
        return value
    accepted = "/".join(TRUE_WORDS) + " or " + "/".join(FALSE_WORDS) + "".join(f" or {word}" for word in extra)
    raise ValueError(f"environment variable {name}: expected {accepted} (any case; empty for the default), "
                     f"got {os.environ[name]!r}")


def env_choice(name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    """The choice ``name``: one of ``choices`` (lower-case words), ``default`` when unset or empty."""
    value = _value(name)
    if value is None:
        return default
    if value not in choices:
        default_text = "" if default is None else f" {default!r}"
        raise ValueError(f"environment variable {name}: expected one of {choices} (any case; empty for the "
                         f"default{default_text}), got {os.environ[name]!r}")
    return value
