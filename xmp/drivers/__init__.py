"""Split drivers: one folder per device class, frontend and backend side by
side on the shared ring / grant / event-channel / xenbus layers."""
