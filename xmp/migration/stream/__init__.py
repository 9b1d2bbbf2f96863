"""Xen's migration stream v2, sans I/O: records in, bytes out, and back.

A save image (and a migration, which is the same bytes over a socket) nests
three layers, each in its own module, each after its Xen document:

    xl header      xl.py      tools/xl/xl.h: magic, byte order, flags, the config
    libxl stream   libxl.py   docs/specs/libxl-migration-stream.pandoc
      LIBXC_CONTEXT, then inline:
        libxc stream  libxc.py  docs/specs/libxc-migration-stream.pandoc (rev. 3)
      … libxl records, END

``framing.py`` holds what the two record layers share: the ``type u32,
body_length u32, body, zero padding to 8`` framing, :class:`StreamError`
(offset, record, message: a remote fault -- disconnect the sender), and the
input buffer the nested readers share.

Readers are fed bytes in any chunking and yield only whole, validated
records; ``close()`` at EOF raises if the stream stopped early.  A whole
image is the writers' bytes in the order of the layers::

    xc, xl = LibxcWriter(DomainType.X86_PV), LibxlWriter()
    out = XlHeader(toml_text, config_is_json=False).encode() + xl.header() + xl.libxc_context()
    out += xc.header() + xc.record(X86PvInfo()) + … + xc.page_data(pfns, types, pages) + …
    out += xc.record(End()) + xl.end()

and :class:`SaveImageReader` reads it back.  Writers
turn records into bytes and refuse (:class:`xmp.errors.LocalError`) what
their reader would refuse.  xmp's own state (the guest kernel's suspend
context, device state) travels in optional records, numbered from
``framing.XMP_REC_TYPE_BASE``, which Xen's tools skip.
"""

from .framing import REC_TYPE_OPTIONAL, XMP_REC_TYPE_BASE, StreamError
from .libxc import LibxcReader, LibxcWriter
from .libxl import LibxlReader, LibxlWriter
from .xl import SaveImageReader, XlHeader

__all__ = [
    "REC_TYPE_OPTIONAL", "XMP_REC_TYPE_BASE", "LibxcReader", "LibxcWriter", "LibxlReader",
    "LibxlWriter", "SaveImageReader", "StreamError", "XlHeader",
]
