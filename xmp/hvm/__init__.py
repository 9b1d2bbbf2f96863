"""HVM: the ioreq mechanism, the device model and its emulated devices."""
