"""Domain ids, as ``xen.h`` defines them: dom0 is 0, ordinary domains take
ids below ``DOMID_FIRST_RESERVED``, and the reserved ids name special
domains in hypercalls (``DOMID_SELF`` is "the caller")."""

DOMID_DOM0 = 0
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_IDLE = 0x7FFF
MAX_DOMID = DOMID_FIRST_RESERVED - 1  # the highest id a domain may have
