"""The PF admin command set as data: ONE table of methods, their parameters, the file
descriptors they take and give back, and what they return.

Rules of this module:

* :data:`METHODS` is the single declaration of the wire contract of the PF admin channel
  (SPDK-style ``object_verb`` names); the dispatcher (:mod:`.model`), the client
  (``vfdirect.adapter.pf_client``) and the reference page (:func:`methods_markdown`,
  written to ``docs/pf-admin.md``) are all derived from it;
* :func:`validate` is the only entry from the wire: unknown method ->
  ``METHOD_NOT_FOUND``; bad parameters -> ``INVALID_PARAMS`` naming the parameter; a wrong
  number of file descriptors -> ``BAD_FDS``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vfdirect.core.adapter.params import (
    FdSpec,
    ParamKind,
    ParamSpec,
    check_fd_count,
    parse_params,
)
from vfdirect.core.array import MAX_LUN
from vfdirect.core.rpc import ErrorCode, RpcError

#: Most VFs one adapter offers (TotalVFs of its SR-IOV capability).
MAX_VFS_LIMIT = 256
#: Highest virtual target id (the virtio-scsi target byte).
MAX_TARGET = 255
#: Highest process id Linux hands out (pid_max limit, 2**22).
MAX_PID = 1 << 22
#: Longest drain deadline the PF accepts, in milliseconds.
MAX_DRAIN_MS = 60_000
#: Largest IO buffer offset or length (1 GiB).
MAX_BUFFER_BYTES = 1 << 30
#: Most file descriptors a request or a reply may carry.
MAX_FDS = 16
#: Most scatter-list entries of one PF IO.
MAX_SG = 256
#: Most IO buffers attached at once.
MAX_BUFFERS = 64


_NO_FDS = FdSpec()


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """One PF admin method."""

    name: str
    group: str
    summary: str
    params: tuple[ParamSpec, ...] = ()
    #: file descriptors the request carries
    fds: FdSpec = _NO_FDS
    #: fields of the result object, with their meaning
    result: tuple[tuple[str, str], ...] = ()
    #: file descriptors the reply carries
    reply_fds: FdSpec = _NO_FDS
    #: claim steps (CLAIMS.md) this method performs
    claims: tuple[str, ...] = ()

    def param(self, name: str) -> ParamSpec:
        return next(p for p in self.params if p.name == name)


def _vf(doc: str = "VF index") -> ParamSpec:
    return ParamSpec("vf", ParamKind.INT, doc, minimum=0, maximum=MAX_VFS_LIMIT - 1)


def _wwpn(doc: str = "the vport's WWPN") -> ParamSpec:
    return ParamSpec("wwpn", ParamKind.WWN, doc)


_VF_VIEW = (
    ("vf", "VF index"),
    ("state", "DISABLED, IDLE, ASSIGNED, CONNECTED, QUIESCED, SAVED or ERROR"),
    ("vm", "{name, pid} of the VM it is assigned to, or null"),
    ("vport", "WWPN of the bound vport, or null"),
    ("socket_path", "its vhost-user socket, or null while unassigned"),
    ("mapping_luns", "number of LUNs in its mapping table (0 without one)"),
    ("mapping_generation", "bumped on every mapping_load/unload"),
    ("error", "the reason of ERROR, or null"),
    ("outstanding", "requests the data path has in flight"),
)

_VPORT_VIEW = (
    ("wwpn", "the vport's WWPN (canonical naa. form)"),
    ("wwnn", "its WWNN"),
    ("alternate_wwpn", "its alternate WWPN, or null (claim X3)"),
    ("logged_in", "true while it holds a fabric login"),
    ("port_name", "the WWPN it is logged in with (wwpn or alternate_wwpn), or null"),
    ("nport_id", "its N_Port ID, 0xDDAAPP, or null"),
    ("vf", "the VF it is bound to, or null"),
)

_MASK_PARAMS = (
    ParamSpec("initiator", ParamKind.WWN, "initiator WWPN (a vport's wwpn or alternate)"),
    ParamSpec("array", ParamKind.WWN, "the storage array's WWN"),
    ParamSpec("luns", ParamKind.INT_LIST, "physical LUN numbers", minimum=0, maximum=MAX_LUN,
              min_items=1, max_items=1024),
)

METHODS: tuple[MethodSpec, ...] = (
    # -- adapter ---------------------------------------------------------------------------
    MethodSpec(
        "adapter_identify", "adapter", "What the adapter is and what it offers.",
        result=(
            ("vendor", "vendor string"), ("model", "model string"),
            ("version", "vfdirect version"), ("protocol_version", "PF admin protocol version"),
            ("max_vfs", "VFs the adapter offers (TotalVFs)"),
            ("vfs_enabled", "VFs currently enabled (NumVFs)"),
            ("physical_port", "{wwpn, wwnn, nport_id} of the physical port"),
            ("fabric", "true once a fabric is attached"),
            ("methods", "names of every admin method"),
        ),
    ),
    MethodSpec(
        "adapter_get_stats", "adapter", "Counters of the admin channel and the PF IO path.",
        result=(
            ("requests", "admin requests by method"), ("errors", "error replies by code name"),
            ("pf_io", "{commands, bytes_in, bytes_out, check_conditions}"),
            ("vfs", "[{vf, state, outstanding, io}] of enabled VFs; io is the data path's "
                    "counters (ios, reads, writes, bytes_in, bytes_out, errors by sense key, "
                    "latency_us_log2 histogram, ...) or null"),
        ),
    ),
    MethodSpec(
        "adapter_dump", "adapter", "The canonical plain-data dump of the whole adapter state.",
        result=(("format", '"vfdirect.adapter-state"'), ("version", "1"),
                ("...", "identity, arrays, vfs (with their mapping tables), vports, buffers")),
    ),
    MethodSpec(
        "array_attach", "adapter",
        "Open a storage array directory (the SAN) and add its target ports to the fabric. "
        "The fabric is the adapter's --fabric-dir, else the directory 'fabric' beside the "
        "first array attached; the physical port logs in (FLOGI) when the fabric is opened.",
        params=(ParamSpec("path", ParamKind.PATH, "the array's directory", max_len=4096),),
        result=(("wwn", "the array's WWN"), ("target_ports", "its target port WWPNs"),
                ("luns", "[{lun, block_size, num_blocks}]"),
                ("fabric_dir", "the shared fabric directory")),
    ),
    # -- fabric ----------------------------------------------------------------------------
    MethodSpec(
        "fabric_zone_create", "fabric", "Create a zone of WWPNs in the shared fabric.",
        params=(
            ParamSpec("name", ParamKind.ZONE, "zone name"),
            ParamSpec("members", ParamKind.WWN_LIST, "member WWPNs", required=False,
                      max_items=256, default=()),
        ),
        result=(("zone", "its name"), ("members", "its member WWPNs")),
    ),
    MethodSpec(
        "fabric_zone_member_add", "fabric", "Add WWPNs to a zone.",
        params=(
            ParamSpec("name", ParamKind.ZONE, "zone name"),
            ParamSpec("members", ParamKind.WWN_LIST, "WWPNs to add", min_items=1,
                      max_items=256),
        ),
        result=(("zone", "its name"), ("members", "its member WWPNs")),
    ),
    MethodSpec(
        "fabric_mask_grant", "fabric",
        "Mask physical LUNs to an initiator WWPN (hot: the next IO sees it).",
        params=_MASK_PARAMS, claims=("A5",),
        result=(("initiator", "WWPN"), ("array", "WWN"), ("changed", "LUNs newly granted")),
    ),
    MethodSpec(
        "fabric_mask_revoke", "fabric",
        "Withdraw physical LUNs from an initiator WWPN (hot: the next IO is refused).",
        params=_MASK_PARAMS,
        result=(("initiator", "WWPN"), ("array", "WWN"), ("changed", "LUNs revoked")),
    ),
    MethodSpec(
        "fabric_show", "fabric", "The shared fabric: configuration, logins, generation.",
        result=(("config", "target ports, zones and masking (the fabric dump)"),
                ("logins", "[{wwpn, wwnn, nport_id, parent, pid}] of every live login"),
                ("generation", "configuration generation counter")),
    ),
    # -- VFs -------------------------------------------------------------------------------
    MethodSpec(
        "vf_enable", "vf",
        "Set the number of enabled VFs (SR-IOV NumVFs): VFs below count become IDLE, those "
        "above must be IDLE (or DISABLED) and become DISABLED.",
        params=(ParamSpec("count", ParamKind.INT, "VFs to enable", minimum=0,
                          maximum=MAX_VFS_LIMIT),),
        result=(("count", "VFs enabled"), ("vfs", "the VF views")),
    ),
    MethodSpec("vf_list", "vf", "Every VF.", result=(("vfs", "the VF views"),)),
    MethodSpec("vf_get", "vf", "One VF.", params=(_vf(),), result=_VF_VIEW),
    MethodSpec(
        "vf_assign", "vf",
        "Assign an IDLE VF to a VM: only that process may then connect to the VF's "
        "vhost-user socket.",
        params=(
            _vf(),
            ParamSpec("vm_name", ParamKind.NAME, "the VM's name", max_len=64),
            ParamSpec("vm_pid", ParamKind.INT, "the VM process id", minimum=1, maximum=MAX_PID),
        ),
        result=_VF_VIEW,
    ),
    MethodSpec(
        "vf_unassign", "vf",
        "Release a VF from its VM: its mapping is dropped and its vport unbound (it stays "
        "logged in); back to IDLE.",
        params=(_vf(),), result=_VF_VIEW,
    ),
    MethodSpec(
        "vf_reset", "vf",
        "Function-level reset: the data path is stopped, ERROR cleared, the assignment, "
        "mapping and binding dropped; back to IDLE.",
        params=(_vf(),), result=_VF_VIEW,
    ),
    # -- vports ----------------------------------------------------------------------------
    MethodSpec(
        "vport_create", "vport", "Create an NPIV virtual port (not logged in yet).",
        params=(
            _wwpn(), ParamSpec("wwnn", ParamKind.WWN, "its WWNN"),
            ParamSpec("alternate_wwpn", ParamKind.WWN,
                      "second WWPN, logged in at a migration destination (claim X3)",
                      required=False),
        ),
        result=_VPORT_VIEW, claims=("A5",),
    ),
    MethodSpec(
        "vport_delete", "vport", "Delete an unbound vport (logging it out if needed).",
        params=(_wwpn(),), result=(("wwpn", "the deleted vport"),),
    ),
    MethodSpec(
        "vport_login", "vport",
        "Log the vport in (FDISC under the adapter's physical port); a port name logged in "
        "anywhere in the fabric is refused (FABRIC_REFUSED, DuplicatePortName).",
        params=(_wwpn(), ParamSpec("alternate", ParamKind.BOOL,
                                   "log in with the alternate WWPN (claim X3)",
                                   required=False, default=False)),
        result=_VPORT_VIEW,
    ),
    MethodSpec("vport_logout", "vport", "Log the vport out (LOGO).", params=(_wwpn(),),
               result=_VPORT_VIEW),
    MethodSpec(
        "vport_bind", "vport",
        "Bind the vport to an assigned VF, logging it in first (FDISC) if it is not.",
        params=(_wwpn(), _vf()), result=_VPORT_VIEW, claims=("A7",),
    ),
    MethodSpec("vport_unbind", "vport", "Unbind the vport from its VF (it stays logged in).",
               params=(_wwpn(),), result=_VPORT_VIEW),
    # -- mapping ---------------------------------------------------------------------------
    MethodSpec(
        "mapping_load", "mapping",
        "Give an assigned VF its copy of the VM's mapping info: per (target, lun) the vdisk, "
        "its geometry, its first mapping (VdiskLayout dump, fully allocated) and its LU "
        "identity (serial, NAA WWN).",
        params=(_vf(), ParamSpec("mapping", ParamKind.OBJECT,
                                 'the table: {"format": "vfdirect.vf-mapping", "version": 1, '
                                 '"luns": [...]}')),
        result=(("vf", "VF index"), ("luns", "LUNs loaded"),
                ("mapping_generation", "the VF's new mapping generation")),
        claims=("A4",),
    ),
    MethodSpec("mapping_unload", "mapping", "Drop a VF's mapping table.", params=(_vf(),),
               result=(("vf", "VF index"), ("mapping_generation", "new generation"))),
    MethodSpec(
        "mapping_get", "mapping", "A VF's mapping table read back, in the form mapping_load "
        "takes (null without one).",
        params=(_vf(),), result=(("vf", "VF index"), ("mapping", "the table or null")),
        claims=("A4",),
    ),
    # -- migration -------------------------------------------------------------------------
    MethodSpec(
        "vf_quiesce", "migration",
        "Stop the VF fetching new requests from the VM's request queues (CONNECTED -> "
        "QUIESCED).",
        params=(_vf(),), result=(("vf", "VF index"), ("outstanding", "requests in flight")),
        claims=("B1",),
    ),
    MethodSpec(
        "vf_drain", "migration",
        "Wait, bounded, until no response is outstanding (QUIESCED); on a SAVED VF, until "
        "the requests it handed over still executing (the record's executing heads) have "
        "finished (claim X2).",
        params=(_vf(), ParamSpec("timeout_ms", ParamKind.INT, "deadline", minimum=0,
                                 maximum=MAX_DRAIN_MS)),
        result=(("vf", "VF index"), ("drained", "true when nothing is outstanding"),
                ("outstanding", "heads of the requests still in flight")),
        claims=("B2", "X2"),
    ),
    MethodSpec(
        "vf_state_save", "migration",
        "Hand the VF's queue state to the PF and revoke its DMA window (QUIESCED and "
        "drained -> SAVED).",
        params=(_vf(),),
        result=(("vf", "VF index"), ("state", "the versioned queue-state record")),
        reply_fds=FdSpec(0, MAX_FDS, "kick/call eventfds and the guest memory, in the order "
                                     "the record lists them"),
        claims=("B3", "B4"),
    ),
    MethodSpec(
        "vf_state_restore", "migration",
        "Load a queue-state record (and its fds) into an assigned or saved VF (-> QUIESCED).",
        params=(_vf(), ParamSpec("state", ParamKind.OBJECT, "a record from vf_state_save")),
        fds=FdSpec(0, MAX_FDS, "the fds the record lists"),
        result=_VF_VIEW, claims=("X1", "B7"),
    ),
    MethodSpec("vf_resume", "migration", "Resume fetching requests (QUIESCED -> CONNECTED).",
               params=(_vf(),), result=_VF_VIEW, claims=("X1",)),
    # -- PF IO (the mediated path) -----------------------------------------------------------
    MethodSpec(
        "pf_io_buffer_attach", "pf_io",
        "Attach a shared-memory file (memfd) as an IO buffer of the mediated path.",
        fds=FdSpec(1, 1, "the memfd"),
        result=(("buffer", "buffer id"), ("size", "its size in bytes")),
    ),
    MethodSpec(
        "pf_io_buffer_detach", "pf_io", "Detach an IO buffer.",
        params=(ParamSpec("buffer", ParamKind.INT, "buffer id", minimum=1, maximum=1 << 31),),
        result=(("buffer", "the detached buffer id"),),
    ),
    MethodSpec(
        "pf_io_submit", "pf_io",
        "Execute one SCSI command on behalf of a logged-in vport, through the mapping of the "
        "VF it is bound to, with its data in an attached buffer (every IO passes the "
        "fabric's masking check).",
        params=(
            _wwpn("the vport on whose behalf the IO is done"),
            ParamSpec("target", ParamKind.INT, "virtual target id", minimum=0,
                      maximum=MAX_TARGET),
            ParamSpec("lun", ParamKind.INT, "LUN", minimum=0, maximum=MAX_LUN),
            ParamSpec("cdb", ParamKind.HEX, "the CDB", min_len=6, max_len=32),
            ParamSpec("buffer", ParamKind.INT, "buffer id (0: no buffer)", minimum=0,
                      maximum=1 << 31, required=False, default=0),
            ParamSpec("sg", ParamKind.SG_LIST, "data segments of the buffer",
                      maximum=MAX_BUFFER_BYTES, max_items=MAX_SG, required=False, default=()),
            ParamSpec("direction", ParamKind.ENUM, "data direction",
                      choices=("none", "to_device", "from_device"), required=False,
                      default="none"),
        ),
        result=(("status", "SCSI status byte"), ("sense", "sense data, hex ('' if none)"),
                ("residual", "bytes of the scatter list not transferred"),
                ("data_len", "bytes transferred")),
        claims=("B6",),
    ),
)

METHOD_BY_NAME: Mapping[str, MethodSpec] = {m.name: m for m in METHODS}
#: Version of the PF admin protocol (bumped on any incompatible change of :data:`METHODS`).
PROTOCOL_VERSION = 1


def validate(method: str, params: Mapping[str, Any], fd_count: int) -> tuple[MethodSpec,
                                                                             dict[str, Any]]:
    """The method's spec and its parsed parameters; ``RpcError`` for anything wrong."""
    spec = METHOD_BY_NAME.get(method)
    if spec is None:
        raise RpcError(ErrorCode.METHOD_NOT_FOUND, f"no method {method!r}")
    parsed = parse_params(method, spec.params, params)
    check_fd_count(method, spec.fds, fd_count)
    return spec, parsed


def methods_markdown() -> str:
    """The reference page of the PF admin channel, generated from :data:`METHODS`."""
    lines = [
        "# PF admin methods",
        "",
        "<!-- generated from vfdirect.core.adapter.methods.METHODS by "
        "`python -m vfdirect.tools.pfdoc > docs/pf-admin.md`; do not edit -->",
        "",
        "JSON-RPC 2.0 over the adapter's `pf.sock` (SOCK_SEQPACKET, one message per packet, "
        "file descriptors with SCM_RIGHTS). Parameters are by name. Errors carry the stable "
        "codes of `vfdirect.core.rpc.ErrorCode`:",
        "",
        "| code | name |",
        "|---|---|",
        *(f"| {int(c)} | {c.name} |" for c in ErrorCode),
        "",
    ]
    group = ""
    for m in METHODS:
        if m.group != group:
            group = m.group
            lines += [f"## {group}", ""]
        lines += [f"### `{m.name}`", "", m.summary, ""]
        if m.claims:
            lines += ["Claims: " + ", ".join(m.claims), ""]
        if m.params:
            lines += ["| parameter | type | required | meaning |", "|---|---|---|---|"]
            for p in m.params:
                default = list(p.default) if isinstance(p.default, tuple) else p.default
                req = "yes" if p.required else f"no (default `{json.dumps(default)}`)"
                lines.append(f"| `{p.name}` | {p.describe()} | {req} | {p.doc} |")
            lines.append("")
        else:
            lines += ["No parameters.", ""]
        if m.fds.maximum:
            lines += [f"File descriptors in: {m.fds.describe()}.", ""]
        if m.result:
            lines += ["| result field | meaning |", "|---|---|"]
            lines += [f"| `{name}` | {doc} |" for name, doc in m.result]
            lines.append("")
        if m.reply_fds.maximum:
            lines += [f"File descriptors out: {m.reply_fds.describe()}.", ""]
    return "\n".join(lines)
