"""The supervisor's parts: the zygote that forks domains, the domain record,
and the control socket.  ``xmp.hypervisor`` ties them together."""
