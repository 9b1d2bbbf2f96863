"""The hypervisor's parts: the zygote that forks domains, the domain record
and builder, the hypercall handlers.  ``xmp.hypervisor`` ties them together."""
