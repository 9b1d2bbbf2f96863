"""Save, restore and migration.

``xmp.migration.stream`` is Xen's migration stream v2 as a sans-I/O codec:
the xl save-file header, the libxl stream and the libxc stream nested in it,
records in and bytes out and back, with every check a restore needs.
``xmp.migration.image`` lays a suspended domain out in it (RAM, guest
context, the domain's record) and reads it back checked -- what
``xmp save`` writes.  Both sit below the toolstack, as libxc's stream code
sits below libxl: ``xmp.toolstack.save`` drives them for ``xmp save`` and
``xmp restore``.  Live migration (files, sockets, pre-copy rounds) sits
above the toolstack.
"""
