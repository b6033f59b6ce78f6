"""The hypervisor (shell): ``vfdirect host``, its inventory, and what it drives."""
