"""Save, restore and migration.

``xmp.migration.stream`` is Xen's migration stream v2 as a sans-I/O codec:
the xl save-file header, the libxl stream and the libxc stream nested in it,
records in and bytes out and back, with every check a restore needs.
``xmp.migration.image`` lays a suspended domain out in it (RAM, guest
context, the domain's record) and reads it back checked -- what
``xmp save`` writes.  Both sit below the toolstack, as libxc's stream code
sits below libxl: ``xmp.toolstack.save`` drives them for ``xmp save`` and
``xmp restore``.  The rest -- the authenticated channel between hosts, the
dirty log, the pre-copy policy and its rounds -- is libxc's share of live
migration, below the toolstack too: ``xmp.toolstack.migrate`` (xl migrate
and migrate-receive) drives it.
"""
