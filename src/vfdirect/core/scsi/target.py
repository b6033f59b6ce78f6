"""A virtual SCSI target: logical units by LUN, and the commands a target answers for
LUNs with or without a logical unit.

Rules of this module:

* :meth:`Target.execute` never raises, whatever the LUN or the CDB;
* REPORT LUNS is answered by the target, addressed to any LUN (SPC-4 6.33: the inventory
  is the target's; LUN 0 need not exist);
* a LUN without a logical unit ("incorrect logical unit selection", SPC-4 6.6.1, 6.39)
  answers INQUIRY with peripheral qualifier 011b and device type 1Fh, REQUEST SENSE with
  GOOD status and sense data LOGICAL UNIT NOT SUPPORTED, and every other command with
  CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED;
* the LU table changes only through :meth:`Target.add_lu` / :meth:`Target.remove_lu`
  (the VF's mapping drives them). There is no REPORTED LUNS DATA HAS CHANGED unit
  attention yet: a virtio-scsi transport announces hot-plug with its own events.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vfdirect.core.ids import LunNumber
from vfdirect.core.scsi.cdb import Inquiry, ReportLuns, RequestSense, decode_cdb
from vfdirect.core.scsi.identity import TargetIdentity
from vfdirect.core.scsi.inquiry import NO_LU_PERIPHERAL, no_lu_vpd_page, standard_inquiry_data
from vfdirect.core.scsi.lu import LogicalUnit, request_sense_reply
from vfdirect.core.scsi.luns import LunError, check_lun, decode_lun, report_luns_data
from vfdirect.core.scsi.opcodes import Opcode, SelectReport
from vfdirect.core.scsi.sense import (
    LOGICAL_UNIT_NOT_SUPPORTED,
    CheckCondition,
    encode_fixed_sense,
)
from vfdirect.core.scsi.task import ErrorReporter, ScsiResult, Task, run_guarded

#: Commands a LUN without a logical unit still answers (SPC-4 6.6.1, 6.33, 6.39).
_NO_LU_COMMANDS = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE})
#: REQUEST SENSE parameter data for a LUN without a logical unit (SPC-4 6.39: "if the
#: logical unit ... reports a peripheral qualifier of 011b ... return parameter data
#: containing sense data with the sense key set to ILLEGAL REQUEST and the additional
#: sense code set to LOGICAL UNIT NOT SUPPORTED").
NO_LU_SENSE_DATA = encode_fixed_sense(LOGICAL_UNIT_NOT_SUPPORTED)


class Target:
    """Logical units by LUN number (0..16383), and the target-level commands."""

    def __init__(
        self,
        identity: TargetIdentity | None = None,
        *,
        on_internal_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._identity = identity if identity is not None else TargetIdentity()
        self._lus: dict[LunNumber, LogicalUnit] = {}
        self._errors = ErrorReporter(on_internal_error)
        self._no_lu_inquiry = standard_inquiry_data(
            NO_LU_PERIPHERAL,
            self._identity.vendor,
            self._identity.product,
            self._identity.revision,
        )

    @property
    def identity(self) -> TargetIdentity:
        return self._identity

    @property
    def internal_errors(self) -> int:
        """Unexpected exceptions on commands that reached no logical unit (those that did
        are counted by the logical unit)."""
        return self._errors.count

    # -- configuration ------------------------------------------------------------------

    def add_lu(self, lun: int, lu: LogicalUnit) -> None:
        """Expose ``lu`` at ``lun``; :class:`LunError` if the LUN is invalid or taken."""
        n = check_lun(lun)
        if not isinstance(lu, LogicalUnit):
            raise TypeError(f"expected a LogicalUnit, not {lu!r}")
        if n in self._lus:
            raise LunError(f"LUN {n} already has a logical unit")
        self._lus[n] = lu

    def remove_lu(self, lun: int) -> LogicalUnit:
        """Withdraw the logical unit at ``lun`` and return it; :class:`LunError` if none."""
        n = check_lun(lun)
        try:
            return self._lus.pop(n)
        except KeyError:
            raise LunError(f"LUN {n} has no logical unit") from None

    def lu(self, lun: int) -> LogicalUnit | None:
        """The logical unit at ``lun``, if any."""
        if isinstance(lun, bool) or not isinstance(lun, int):
            return None
        return self._lus.get(LunNumber(lun))

    def luns(self) -> list[LunNumber]:
        """LUN numbers with a logical unit, ascending."""
        return sorted(self._lus)

    def __len__(self) -> int:
        return len(self._lus)

    # -- execution ----------------------------------------------------------------------

    def execute(
        self,
        lun: int,
        cdb: bytes | bytearray | memoryview,
        data_out: Sequence[memoryview] = (),
        data_in: Sequence[memoryview] = (),
    ) -> ScsiResult:
        """Execute one CDB addressed to ``lun``; never raises."""
        lu = self.lu(lun)
        errors = lu.errors if lu is not None else self._errors

        def body(task: Task) -> None:
            self._dispatch(lu, cdb, task)

        return run_guarded(body, data_out, data_in, errors)

    def execute_lun_bytes(
        self,
        lun: bytes | bytearray | memoryview,
        cdb: bytes | bytearray | memoryview,
        data_out: Sequence[memoryview] = (),
        data_in: Sequence[memoryview] = (),
    ) -> ScsiResult:
        """:meth:`execute` for an 8-byte SAM-5 LUN as it came off the wire. A LUN this
        target cannot decode (another address method, a second level) is a LUN without
        a logical unit, answered as :meth:`execute` answers those; never raises."""
        try:
            number: int = decode_lun(lun)
        except (LunError, TypeError):
            number = -1  # no logical unit can live there
        return self.execute(number, cdb, data_out, data_in)

    def _dispatch(
        self, lu: LogicalUnit | None, cdb: bytes | bytearray | memoryview, task: Task
    ) -> None:
        raw = bytes(cdb)
        if lu is None and (not raw or raw[0] not in _NO_LU_COMMANDS):
            raise CheckCondition(LOGICAL_UNIT_NOT_SUPPORTED, reason="no logical unit at this LUN")
        cmd = decode_cdb(raw)
        if isinstance(cmd, ReportLuns):
            self._report_luns(cmd, task)
        elif lu is not None:
            lu.execute_command(cmd, task)
        elif isinstance(cmd, Inquiry):
            self._no_lu_inquiry_reply(cmd, task)
        elif isinstance(cmd, RequestSense):
            request_sense_reply(cmd, task, NO_LU_SENSE_DATA)
        else:  # unreachable: _NO_LU_COMMANDS decode to the three types above
            raise CheckCondition(LOGICAL_UNIT_NOT_SUPPORTED)

    def _no_lu_inquiry_reply(self, cmd: Inquiry, task: Task) -> None:
        if not cmd.evpd:
            task.send(self._no_lu_inquiry, cmd.allocation_length)
            return
        page = no_lu_vpd_page(cmd.page_code)
        if page is None:
            raise CheckCondition.invalid_cdb_field(
                2, reason=f"VPD page {cmd.page_code:#04x} is not supported without a logical unit"
            )
        task.send(page, cmd.allocation_length)

    def _report_luns(self, cmd: ReportLuns, task: Task) -> None:
        select = cmd.select_report
        if select in (SelectReport.LOGICAL_UNITS, SelectReport.ADMINISTRATIVE_AND_NON_CONGLOMERATE):
            # 00h: every LU of the peripheral addressing methods; 11h: administrative
            # plus non-conglomerate LUs, and no LU here belongs to a conglomerate.
            luns: list[LunNumber] = self.luns()
        elif select == SelectReport.ALL:
            # SPC-4 6.33: for 02h a null inventory is replaced by a default one holding
            # at least LUN 0 (we have no REPORT LUNS well-known LU to offer instead).
            luns = self.luns() or [LunNumber(0)]
        elif select in (SelectReport.WELL_KNOWN_ONLY, SelectReport.ADMINISTRATIVE_ONLY):
            luns = []  # no well-known and no administrative logical units
        else:
            # 12h asks for the subsidiaries of the addressed administrative LU, and we
            # have none; other values are reserved or vendor specific.
            raise CheckCondition.invalid_cdb_field(
                2, reason=f"SELECT REPORT {select:#04x} is not supported"
            )
        task.send(report_luns_data(luns), cmd.allocation_length)
