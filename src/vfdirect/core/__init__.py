"""Pure cores of vfdirect.

Rules for every module under ``vfdirect.core``:

* no sockets, files, mmap, threads, subprocesses or clock reads; time, when needed, is a
  value passed in by the caller;
* input from a peer (a CDB, a descriptor, a wire message) is decoded or rejected with the
  protocol's own error type, never with ``IndexError``/``struct.error``;
* state that must be saved is a frozen dataclass or plain data (``dump()``/``load()``);
* a core module imports only the standard library and other core modules.

Shells (``vfdirect.storage``, daemons, transports, CLI) feed these cores and carry out
the IO they ask for.
"""
