"""The hypervisor (shell): ``vfdirect host``, its inventory, and what it drives.

* :mod:`.inventory`: the database of everything the host creates (claim A9);
* :mod:`.service`: the operations, claim A step by step, VM lifecycle, reconciliation;
* :mod:`.adapter_link`: the adapter process and the PF connection (the only way in);
* :mod:`.vms`: VM processes (``vm-run``), their memory file's page 0 and console;
* :mod:`.api`: the REST API (FastAPI); :mod:`.client`: its httpx client;
* :mod:`.daemon`: the daemon's start-up and stop; :mod:`.log`: its structured log.
"""
