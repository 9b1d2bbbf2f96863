"""The virtual block device: Xen's blkif split driver."""
