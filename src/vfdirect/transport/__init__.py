"""Process-boundary transports (shell): shared memory files, fd passing, eventfds.

Thin wrappers over the operating system that the daemons share; protocol logic lives in
:mod:`vfdirect.core`.
"""
