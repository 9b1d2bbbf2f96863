"""The page, Xen's unit of memory (x86: 4 KiB).

A module of its own so that the sans-I/O cores (rings, grants, event
channels) get the constant without importing the OS adapters in shm.py.
"""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
