"""What vping keeps outside the guest's RAM, and how it is rebuilt when the
guest moves."""

from xmp.devices import MoveState

STATE = MoveState(
    frontend_outside_ram=(
        "the xenbus device and its watches",
        "the requests in flight and the answers not yet taken",
        "its ring's grant ref and its event-channel port",
    ),
    frontend_rebuild=(
        "on a new backend it grants a fresh ring, binds a fresh port and sends every request still in "
        "flight again (the backend's answer is a pure function of the request, so a repeat is harmless)"
    ),
    backend_outside_ram=("the mapping of the frontend's ring", "its port", "its count of answers"),
    backend_rebuild="none moves: the new backend domain maps the new ring when the frontend connects",
)
