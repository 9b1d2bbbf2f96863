"""vping: the smallest split driver -- a frontend sends 64-byte requests on
a one-page ring.h ring, the backend answers each with its bytes reversed.
It proves the xenbus driver API and the whole stack (grants, event
channels, rings, xenstore) and is the template for real drivers."""
