"""Loads the compiled fast path, or says exactly why it cannot.

There is deliberately no pure-Python stand-in: Python cannot fence, and a
pure-Python ring was seen here to lose a wake-up in millions of messages.
"""

try:
    from xmp.sharedmem._fast import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "xmp's C fast path (xmp.sharedmem._fast) is not built: "
        f"{exc}. It is compiled with gcc and the Python headers during "
        "installation; install them (Debian: apt-get install gcc python3-dev) "
        "and reinstall with `pip install -e '.[test]'` from the xmp checkout."
    ) from exc

__all__ = ["ffi", "lib"]
