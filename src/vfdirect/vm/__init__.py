"""The VM process (shell): guest memory file, vhost-user front end to its VF, the
virtio-scsi host, the block layer and the built-in workloads. Pure pieces live in
:mod:`vfdirect.core.guest`."""
