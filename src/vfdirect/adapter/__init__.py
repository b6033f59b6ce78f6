"""The adapter daemon (shell): the PF admin channel, the platform the adapter model runs
on, and the hypervisor's client.

* :mod:`.daemon`: start-up, signals, shutdown (``vfdirect adapter``);
* :mod:`.server`: ``pf.sock``, SOCK_SEQPACKET, SO_PEERCRED, SCM_RIGHTS, asyncio;
* :mod:`.service`: the model behind one lock, packets in and out, never raising;
* :mod:`.platform`: the shared fabric, arrays, LUN files, IO buffers, VF data path hooks;
* :mod:`.pf_client`: the hypervisor's synchronous client;
* :mod:`.log`: one line per event, text or JSON.
"""
