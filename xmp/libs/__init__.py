"""dom0's libraries: the public face of the hypervisor's facilities for
tools in dom0, a driver domain or (where Xen allows it) a guest, as Xen's
``tools/libs``.  In dependency order:

* :mod:`xmp.libs.evtchn` -- libxenevtchn: bind, notify, pending, unmask, an fd.
* :mod:`xmp.libs.gnttab` -- libxengnttab (map a peer's grants, grant copy)
  and libxengntshr (share our pages with a peer).
* :mod:`xmp.libs.foreignmemory` -- libxenforeignmemory: map a guest's pfns
  (privileged, as privcmd).
* :mod:`xmp.libs.vchan` -- libxenvchan: a byte stream between two domains.

Each opens on the domain's :class:`~xmp.domain_proc.kernel.Kernel`, the
way Xen's open on ``/dev/xen/*``: what a handle may do is what the
hypervisor lets that domain do.  The drivers keep their own fast paths.
"""
