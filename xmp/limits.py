"""What one host can hold: the ordinary limits a topology runs into.

Every domain costs open descriptors in two long-lived processes: the
supervisor (its RAM and event objects, its wake page, the doorbells others
ring it through, its hypercall channel) and dom0 (xenconsoled's and
xenstored's mappings of the guest's RAM, the doorbells and wake pages of
their two interdomain ports, its console log and socket; a backend's files
for each device it serves -- blkback's image).  dom0 is forked from the
supervisor's zygote and inherits its ``RLIMIT_NOFILE``, so one soft limit
bounds both.  The costs here were measured (``/proc/<pid>/fd`` of both
processes with 30 and 1,000 idle guests: +12 and +11 a domain);
``benchmarks/bench_scale.py`` re-measures them.  A domain that would cross the limit is refused before
anything of it is built, with the limit named, instead of EMFILE half-way
through (the supervisor crashed; dom0 lost xenstore and consoles for later
guests).

Every guest also takes dom0 two event channels (xenconsoled's and
xenstored's interdomain ports) and each device up to one a queue
(blkback), out of dom0's ``max_event_channels`` -- 4096, all the 2-level
ABI has (Xen does not cap dom0 at xl's 1023 for guests).  1,000 idle
guests ran dom0 out of ports at ~510 before dom0 had that default.

Domain ids are Xen's: 1..``MAX_DOMID`` (:mod:`xmp.domid`), never reused
within a supervisor's life.
"""

from __future__ import annotations

import resource

from xmp.domid import MAX_DOMID

SUPERVISOR_FDS_PER_DOMAIN = 12
DOM0_FDS_PER_DOMAIN = 11
DOM0_FDS_PER_DEVICE = 2     # a disk's image, and room for the backend's own objects
FDS_RESERVED = 64           # each process's base set, `xmp` clients, descriptors in flight while building
DOM0_PORTS = 4096           # dom0's max_event_channels: EVTCHN_2L_NR_CHANNELS
DOM0_PORTS_PER_DOMAIN = 2   # console and xenstore
DOM0_PORTS_PER_DEVICE = 4   # a backend's: blkback binds one a queue, up to 4 queues
PORTS_RESERVED = 32         # dom0's own VIRQs and its services' ports


def nofile_limits() -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE, RLIM_INFINITY read as the kernel's nr_open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = _nr_open()
    return (ceiling if soft == resource.RLIM_INFINITY else soft,
            ceiling if hard == resource.RLIM_INFINITY else hard)


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (what an unprivileged
    process may do); return the soft limit now in force."""
    soft, hard = nofile_limits()
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def domain_cost(devices: int = 0) -> int:
    """Descriptors one domain costs its costliest holder (the supervisor,
    or dom0 once it serves the domain's devices)."""
    return max(SUPERVISOR_FDS_PER_DOMAIN, DOM0_FDS_PER_DOMAIN + DOM0_FDS_PER_DEVICE * devices)


def domain_ports(devices: int = 0) -> int:
    """dom0 event channels one guest takes."""
    return DOM0_PORTS_PER_DOMAIN + DOM0_PORTS_PER_DEVICE * devices


def _by_fds(nofile: int) -> int:
    return max(0, (nofile - FDS_RESERVED) // domain_cost())


def _by_ports() -> int:
    return 1 + (DOM0_PORTS - 1 - PORTS_RESERVED) // domain_ports()  # dom0 takes none of its own


def capacity(nofile: int) -> int:
    """How many deviceless domains (dom0 included) a host holds whose soft
    RLIMIT_NOFILE is ``nofile``: the least of descriptors, dom0's event
    channels and domain ids."""
    return min(_by_fds(nofile), _by_ports(), MAX_DOMID + 1)


def describe_capacity(nofile: int) -> str:
    """"this host can hold N domains (<the limit that binds>…)"."""
    hard = nofile_limits()[1]
    fds = (f"RLIMIT_NOFILE {nofile}, hard limit {hard}; the supervisor keeps {SUPERVISOR_FDS_PER_DOMAIN} "
           f"descriptors a domain, dom0 {DOM0_FDS_PER_DOMAIN} and {DOM0_FDS_PER_DEVICE} a device")
    ports = (f"dom0's {DOM0_PORTS} event channels: {DOM0_PORTS_PER_DOMAIN} a guest and up to "
             f"{DOM0_PORTS_PER_DEVICE} a device")
    n = capacity(nofile)
    if n == _by_fds(nofile):
        why = fds
    elif n == _by_ports():
        why = f"{ports}; {fds}"
    else:
        why = f"Xen's domain ids end at {MAX_DOMID}; {fds}"
    return f"this host can hold {n} domains ({why})"


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20
