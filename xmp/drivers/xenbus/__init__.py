"""xenbus: the frontend/backend handshake over xenstore (``state.py`` is
the pure state machine)."""
