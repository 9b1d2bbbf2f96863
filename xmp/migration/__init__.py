"""Save, restore and migration.

``xmp.migration.stream`` is Xen's migration stream v2 as a sans-I/O codec:
the xl save-file header, the libxl stream and the libxc stream nested in it,
records in and bytes out and back, with every check a restore needs.  The
layers that move the bytes (files, sockets, pre-copy rounds) sit above it.
"""
