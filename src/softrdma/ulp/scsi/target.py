"""The SCSI target core: logical units, the two-phase command flow,
per-nexus task sets, unit attentions and task management.

Kernel counterparts: LIO's ``drivers/target/target_core_transport.c``
(``target_setup_cmd_from_cdb``, ``target_cmd_size_check``,
``target_execute_cmd``, ``target_complete_cmd_with_length``),
``target_core_device.c`` (``transport_lookup_cmd_lun``),
``target_core_ua.c`` (``target_scsi3_ua_check``,
``core_scsi3_ua_for_check_condition``,
``core_scsi3_ua_clear_for_request_sense``) and ``target_core_tmr.c``
(``core_tmr_abort_task``, ``core_tmr_lun_reset``); SAM-5 for the
semantics.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from softrdma.ulp.scsi.backstore import Backstore
from softrdma.ulp.scsi.cdb import Direction, Opcode, Parsed, cdb_size, check_control_byte
from softrdma.ulp.scsi.lu import LogicalUnit, check_ascii
from softrdma.ulp.scsi.lun import lun_from_any
from softrdma.ulp.scsi.sbc import SBC_PARSERS
from softrdma.ulp.scsi.sense import (
    AdditionalSense,
    CheckCondition,
    ScsiStatus,
    ScsiUsageError,
    SenseData,
    SenseKey,
    illegal_request,
)
from softrdma.ulp.scsi.spc import (
    SPC_PARSERS,
    VERSION_SAM5,
    VERSION_SBC3,
    VERSION_SPC4,
    SpcRequest,
    TargetIdentity,
)

__all__ = [
    "DEFAULT_MAX_TRANSFER",
    "CommandPlan",
    "CommandState",
    "Nexus",
    "ScsiResult",
    "ScsiTarget",
    "TmFunction",
    "TmfResponse",
    "TmfResult",
]

#: The per-command transfer cap: a READ or WRITE moving more is refused
#: with INVALID FIELD IN CDB (LIO: ``hw_max_sectors``).
DEFAULT_MAX_TRANSFER = 8 << 20
MAX_CDB_LEN = 260  # SAM-5: the longest CDB (a variable-length CDB)
_U64 = 1 << 64

#: Commands served for a LUN with no logical unit and not blocked by a
#: pending unit attention (SPC-4 / SAM-5 unit attention condition:
#: INQUIRY, REPORT LUNS, REQUEST SENSE).
_NO_LU_OK = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE})


@dataclass(frozen=True)
class Nexus:
    """An I_T nexus: one initiator port talking to one target port (SAM-5;
    LIO's ``se_session`` / ``se_node_acl``). The transport chooses
    the names — SRP the initiator and target port identifiers, iSCSI the
    initiator and target names with their ISID / TPGT."""

    initiator: str | bytes
    target_port: str | bytes = ""


class CommandState(enum.Enum):
    """Where a :class:`CommandPlan` is in its life."""

    PENDING = "pending"  #: set up, outstanding, waiting for execute
    COMPLETED = "completed"  #: has its result (executed, or failed at setup)
    ABORTED = "aborted"  #: aborted by task management before execution
    RELEASED = "released"  #: given up by the transport with release()


@dataclass(frozen=True)
class ScsiResult:
    """What the transport reports back for a command (LIO's
    ``se_cmd->scsi_status``, sense buffer, data-in and residual).

    ``data_in`` is what to send to the initiator (already cut to the
    allocation length and the transport's buffer). ``underflow`` /
    ``overflow`` are the residual counts against the transport's expected
    length (SRP DIUNDER / DIOVER or DOUNDER / DOOVER with the command's
    direction; iSCSI's U / O bits and residual count): underflow is what
    the initiator expected and did not get, overflow what the command
    would have moved beyond the transport's buffer. ``aborted`` marks a
    command ended by task management: with TAS 0 (the control mode page)
    no status is owed to the initiator for it.
    """

    status: ScsiStatus
    sense: bytes = b""
    data_in: bytes = b""
    underflow: int = 0
    overflow: int = 0
    aborted: bool = False

    @property
    def sense_data(self) -> SenseData | None:
        """The decoded sense data, if any."""
        return SenseData.decode(self.sense) if self.sense else None


class CommandPlan:
    """One command between :meth:`ScsiTarget.setup` and
    :meth:`ScsiTarget.execute` (LIO's ``se_cmd`` after
    ``target_setup_cmd_from_cdb``).

    The transport reads ``direction`` and ``transfer_length`` to move the
    data: for DATA_OUT it fetches exactly ``transfer_length`` bytes (RDMA
    READ, immediate data) and passes them to ``execute``; for DATA_IN
    ``execute`` returns at most ``transfer_length`` bytes to send. A plan
    that failed at setup (``state`` COMPLETED, ``result`` set) moves no
    data; ``execute`` returns its result.
    """

    __slots__ = (
        "_executed",
        "_parsed",
        "_target",
        "cdb",
        "cdb_length",
        "direction",
        "expected_length",
        "lun",
        "name",
        "nexus",
        "result",
        "state",
        "tag",
        "transfer_length",
    )

    def __init__(
        self,
        target: ScsiTarget,
        nexus: Nexus,
        lun: int | None,
        cdb: bytes,
        tag: int | None,
        expected_length: int | None,
    ) -> None:
        self._target = target
        self._parsed: Parsed | None = None
        self._executed = False
        self.nexus = nexus
        #: The LUN number, or None when the LUN field addresses nothing here.
        self.lun = lun
        self.cdb = cdb
        self.tag = tag
        #: The command's name ("READ(10)"), or the opcode in hex when unparsed.
        self.name = f"opcode {cdb[0]:#04x}"
        self.direction = Direction.NONE
        #: The transfer length the CDB specifies, in bytes.
        self.cdb_length = 0
        #: The transport's expected length (its buffers), None if not given.
        self.expected_length = expected_length
        #: The bytes that move: exact for DATA_OUT, at most for DATA_IN.
        self.transfer_length = 0
        self.state = CommandState.PENDING
        self.result: ScsiResult | None = None

    @property
    def data_out_length(self) -> int:
        """Bytes of write data ``execute`` needs (0 unless DATA_OUT)."""
        return self.transfer_length if self.direction is Direction.DATA_OUT else 0

    def __repr__(self) -> str:
        return (
            f"CommandPlan({self.name}, lun={self.lun}, tag={self.tag}, {self.direction.value} "
            f"{self.transfer_length}, {self.state.value})"
        )


_PlanFilter = Callable[[CommandPlan], bool]


class TmFunction(enum.Enum):
    """SAM-5 task management functions (LIO's ``TMR_*``; SRP and iSCSI
    carry their own codes, which the transport maps)."""

    ABORT_TASK = "ABORT TASK"
    ABORT_TASK_SET = "ABORT TASK SET"
    CLEAR_ACA = "CLEAR ACA"
    CLEAR_TASK_SET = "CLEAR TASK SET"
    I_T_NEXUS_RESET = "I_T NEXUS RESET"
    LOGICAL_UNIT_RESET = "LOGICAL UNIT RESET"
    QUERY_TASK = "QUERY TASK"


class TmfResponse(enum.Enum):
    """SAM-5 service responses of a task management function (LIO's
    ``TMR_FUNCTION_COMPLETE`` …; SRP maps them to its RSP response codes:
    00h complete, 04h not supported, 05h failed, 08h succeeded, 09h
    incorrect LUN)."""

    FUNCTION_COMPLETE = "FUNCTION COMPLETE"
    FUNCTION_SUCCEEDED = "FUNCTION SUCCEEDED"
    FUNCTION_REJECTED = "FUNCTION REJECTED"
    INCORRECT_LOGICAL_UNIT_NUMBER = "INCORRECT LOGICAL UNIT NUMBER"


@dataclass(frozen=True)
class TmfResult:
    """The response of a task management function and the commands it
    aborted (each now ABORTED: the transport must not move their data)."""

    response: TmfResponse
    aborted: tuple[CommandPlan, ...] = ()


@dataclass
class _NexusState:
    """Per I_T nexus: its task set (outstanding commands by tag) and its
    pending unit attentions per LUN (LIO's ``se_dev_entry->ua_list``)."""

    tasks: dict[object, CommandPlan] = field(default_factory=dict)
    unit_attentions: dict[int, list[AdditionalSense]] = field(default_factory=dict)


class ScsiTarget:
    """A SCSI target device: LUNs backed by backstores, served to any number
    of I_T nexuses through a sans-IO, transport-independent two-phase flow
    (LIO's target core as ``ib_srpt`` and ``ib_isert`` use it).

    ``vendor`` / ``product`` / ``revision`` are the INQUIRY identification
    (8 / 16 / 4 printable ASCII characters); ``transport_version`` adds the
    transport's version descriptor (``VERSION_SRP``, ``VERSION_ISCSI``) to
    SAM-5, SPC-4 and SBC-3. ``max_transfer_bytes`` caps one READ / WRITE
    (a multiple of 4096, default 8 MiB); ``max_tasks_per_nexus`` caps the
    commands a nexus may have outstanding — past it, setup answers TASK SET
    FULL — so no initiator can make the core hold unbounded memory.
    """

    def __init__(
        self,
        *,
        vendor: str = "SOFTRDMA",
        product: str = "FILEIO",
        revision: str = "0001",
        transport_version: int | None = None,
        max_transfer_bytes: int = DEFAULT_MAX_TRANSFER,
        max_tasks_per_nexus: int = 1024,
    ) -> None:
        if not 4096 <= max_transfer_bytes <= 1 << 30 or max_transfer_bytes % 4096:
            raise ScsiUsageError(
                f"max_transfer_bytes {max_transfer_bytes}: a multiple of 4096 up to 1 GiB"
            )
        if max_tasks_per_nexus < 1:
            raise ScsiUsageError(f"max_tasks_per_nexus {max_tasks_per_nexus}: at least 1")
        if transport_version is not None and not 0 <= transport_version <= 0xFFFF:
            raise ScsiUsageError(f"transport version descriptor {transport_version}: 16 bits")
        versions = [VERSION_SAM5]
        if transport_version is not None:
            versions.append(transport_version)
        versions += [VERSION_SPC4, VERSION_SBC3]
        self.identity = TargetIdentity(
            vendor=check_ascii("vendor", vendor, 8),
            product=check_ascii("product", product, 16),
            revision=check_ascii("revision", revision, 4),
            version_descriptors=tuple(versions),
            max_transfer_bytes=max_transfer_bytes,
        )
        self.max_tasks_per_nexus = max_tasks_per_nexus
        self._luns: dict[int, LogicalUnit] = {}
        self._nexuses: dict[Nexus, _NexusState] = {}

    @property
    def max_transfer_bytes(self) -> int:
        """The per-command transfer cap in bytes."""
        return self.identity.max_transfer_bytes

    # --- logical units --------------------------------------------------------------------

    def add_lun(
        self, lun: int, backstore: Backstore, *, unit_serial: str | None = None
    ) -> LogicalUnit:
        """Export ``backstore`` as LUN ``lun`` (0 .. 16383) (LIO:
        ``core_dev_add_lun``). Nexuses already known get a REPORTED LUNS
        DATA HAS CHANGED unit attention on their other LUNs."""
        if lun in self._luns:
            raise ScsiUsageError(f"LUN {lun} already exists")
        unit = LogicalUnit(lun, backstore, unit_serial=unit_serial)
        others = list(self._luns)
        self._luns[lun] = unit
        self._luns_changed(others)
        return unit

    def remove_lun(self, lun: int) -> LogicalUnit:
        """Stop exporting LUN ``lun`` (LIO: ``core_dev_del_lun``): its
        outstanding commands are aborted, its unit attentions dropped, and
        every nexus gets REPORTED LUNS DATA HAS CHANGED on the other LUNs.
        The backstore is not closed."""
        unit = self._luns.pop(lun, None)
        if unit is None:
            raise ScsiUsageError(f"no LUN {lun}")
        for state in self._nexuses.values():
            self._abort(state, lambda plan: plan.lun == lun)
            state.unit_attentions.pop(lun, None)
        self._luns_changed(list(self._luns))
        return unit

    def lun(self, lun: int) -> LogicalUnit | None:
        """The logical unit at LUN ``lun``, if any."""
        return self._luns.get(lun)

    @property
    def luns(self) -> dict[int, LogicalUnit]:
        """The logical units by LUN number (a copy)."""
        return dict(sorted(self._luns.items()))

    def _luns_changed(self, luns: Iterable[int]) -> None:
        targets = list(luns)
        for nexus in self._nexuses:
            for lun in targets:
                self._add_unit_attention(nexus, lun, AdditionalSense.REPORTED_LUNS_DATA_HAS_CHANGED)

    # --- nexuses and unit attentions ------------------------------------------------------

    def add_nexus(self, nexus: Nexus) -> None:
        """Make ``nexus`` known (a login; LIO: ``transport_register_session``).
        A nexus that sends a command or a task management function is added
        implicitly; being known matters for the unit attentions other
        nexuses' resets establish."""
        self._state(nexus)

    def remove_nexus(self, nexus: Nexus) -> tuple[CommandPlan, ...]:
        """Forget ``nexus`` (a logout or lost connection; LIO:
        ``transport_deregister_session``): its outstanding commands are
        aborted and returned, its unit attentions dropped."""
        state = self._nexuses.pop(nexus, None)
        if state is None:
            return ()
        return self._abort(state, lambda plan: True)

    @property
    def nexuses(self) -> tuple[Nexus, ...]:
        """The known I_T nexuses."""
        return tuple(self._nexuses)

    def _state(self, nexus: Nexus) -> _NexusState:
        if not isinstance(nexus, Nexus):
            raise ScsiUsageError(f"{nexus!r} is not a Nexus")
        state = self._nexuses.get(nexus)
        if state is None:
            state = self._nexuses[nexus] = _NexusState()
        return state

    def unit_attentions(self, nexus: Nexus, lun: int) -> tuple[AdditionalSense, ...]:
        """The unit attention conditions pending for ``nexus`` on ``lun``,
        oldest first (the one reported next comes first)."""
        state = self._nexuses.get(nexus)
        if state is None:
            return ()
        return tuple(state.unit_attentions.get(lun, ()))

    def _add_unit_attention(self, nexus: Nexus, lun: int, code: AdditionalSense) -> None:
        """Establish a unit attention (``core_scsi3_ua_allocate``); a
        condition already pending is not queued twice, which bounds the
        queue."""
        pending = self._nexuses[nexus].unit_attentions.setdefault(lun, [])
        if code not in pending:
            pending.append(code)

    def _take_unit_attention(self, nexus: Nexus, lun: int) -> AdditionalSense | None:
        """Report-and-clear the oldest pending unit attention
        (``core_scsi3_ua_for_check_condition`` with UA_INTLCK_CTRL 00b)."""
        state = self._nexuses.get(nexus)
        pending = state.unit_attentions.get(lun) if state else None
        if not pending:
            return None
        return pending.pop(0)

    def _clear_luns_changed(self, nexus: Nexus) -> None:
        """REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED for its nexus
        on every LUN (SPC-4, REPORT LUNS)."""
        state = self._nexuses.get(nexus)
        if state is None:
            return
        for pending in state.unit_attentions.values():
            if AdditionalSense.REPORTED_LUNS_DATA_HAS_CHANGED in pending:
                pending.remove(AdditionalSense.REPORTED_LUNS_DATA_HAS_CHANGED)

    # --- the command flow -----------------------------------------------------------------

    def setup(
        self,
        nexus: Nexus,
        lun: int | bytes | bytearray | memoryview,
        cdb: bytes | bytearray | memoryview,
        *,
        tag: int | None = None,
        expected_length: int | None = None,
    ) -> CommandPlan:
        """Phase one: decode a command (``target_setup_cmd_from_cdb`` with
        ``spc_parse_cdb`` / ``sbc_parse_cdb``) and say how its data moves.

        ``lun`` is the 8-byte LUN field, a LUN number, or a Linux LUN number
        (see :func:`~softrdma.ulp.scsi.lun_from_any`); ``cdb`` the CDB
        (at least the opcode's length; extra bytes, such as the padding of a
        16-byte SRP CDB field, are ignored); ``tag`` the command's task tag,
        which ABORT TASK names; ``expected_length`` the bytes the
        transport's buffers hold (the SRP descriptors' total, iSCSI's
        expected data transfer length), from which residuals are computed.

        Checks, in order: an overlapped tag (ABORTED COMMAND / OVERLAPPED
        COMMANDS ATTEMPTED), a full task set (TASK SET FULL), the LUN
        (LOGICAL UNIT NOT SUPPORTED, except for INQUIRY, REPORT LUNS and
        REQUEST SENSE), a pending unit attention (reported and cleared,
        except for those three), the opcode (INVALID COMMAND OPERATION
        CODE), the CONTROL byte and every CDB field, the range and the
        transfer cap, then for a WRITE that the transport's length equals
        the CDB's (else INVALID FIELD IN COMMAND INFORMATION UNIT, as LIO
        rejects write overflow / underflow). A command failing any of them
        comes back with ``result`` already set and moves no data; the others
        are outstanding until executed, aborted or released.
        """
        data = self._check_cdb(cdb)
        if tag is not None and (isinstance(tag, bool) or not isinstance(tag, int)):
            raise ScsiUsageError(f"tag {tag!r}: an int")
        if tag is not None and not 0 <= tag < _U64:
            raise ScsiUsageError(f"tag {tag:#x}: 64 bits")
        if expected_length is not None and (
            isinstance(expected_length, bool)
            or not isinstance(expected_length, int)
            or expected_length < 0
        ):
            raise ScsiUsageError(f"expected_length {expected_length!r}: an int >= 0")
        lun_number = lun_from_any(lun)
        state = self._state(nexus)
        unit = self._luns.get(lun_number) if lun_number is not None else None
        plan = CommandPlan(self, nexus, lun_number, data, tag, expected_length)

        if tag is not None and tag in state.tasks:
            return self._fail_at_setup(
                plan,
                SenseData.of(
                    SenseKey.ABORTED_COMMAND, AdditionalSense.OVERLAPPED_COMMANDS_ATTEMPTED
                ),
            )
        if len(state.tasks) >= self.max_tasks_per_nexus:
            plan.state = CommandState.COMPLETED
            plan.result = ScsiResult(ScsiStatus.TASK_SET_FULL, underflow=expected_length or 0)
            return plan
        try:
            parsed = self._parse(nexus, lun_number, unit, data)
        except CheckCondition as cc:
            return self._fail_at_setup(plan, cc.sense)

        plan._parsed = parsed
        plan.name = parsed.name
        plan.direction = parsed.direction
        plan.cdb_length = parsed.length
        expected = parsed.length if expected_length is None else expected_length
        if parsed.direction is Direction.DATA_OUT:
            if expected != parsed.length:
                return self._fail_at_setup(
                    plan,
                    SenseData.of(
                        SenseKey.ILLEGAL_REQUEST, AdditionalSense.INVALID_FIELD_IN_COMMAND_IU
                    ),
                )
            plan.transfer_length = parsed.length
        elif parsed.direction is Direction.DATA_IN:
            plan.transfer_length = min(parsed.length, expected)
        state.tasks[tag if tag is not None else plan] = plan
        return plan

    def _check_cdb(self, cdb: bytes | bytearray | memoryview) -> bytes:
        if not isinstance(cdb, bytes | bytearray | memoryview):
            raise ScsiUsageError(f"CDB {cdb!r}: bytes")
        data = bytes(cdb)
        if not 1 <= len(data) <= MAX_CDB_LEN:
            raise ScsiUsageError(f"a CDB is 1..{MAX_CDB_LEN} bytes, got {len(data)}")
        return data

    def _parse(self, nexus: Nexus, lun: int | None, unit: LogicalUnit | None, cdb: bytes) -> Parsed:
        opcode = cdb[0]
        exempt = opcode in _NO_LU_OK
        if unit is None and not exempt:
            raise CheckCondition(
                SenseData.of(SenseKey.ILLEGAL_REQUEST, AdditionalSense.LOGICAL_UNIT_NOT_SUPPORTED)
            )
        if unit is not None and not exempt:
            attention = self._take_unit_attention(nexus, unit.number)
            if attention is not None:
                raise CheckCondition(SenseData.of(SenseKey.UNIT_ATTENTION, attention))
        spc = SPC_PARSERS.get(opcode)
        sbc = SBC_PARSERS.get(opcode)
        size = cdb_size(opcode)
        if (spc is None and sbc is None) or size is None:
            raise illegal_request(AdditionalSense.INVALID_COMMAND_OPERATION_CODE)
        if len(cdb) < size:
            raise illegal_request(AdditionalSense.INVALID_FIELD_IN_CDB, 0)
        cdb = cdb[:size]
        check_control_byte(cdb, size)
        if spc is not None:
            number = unit.number if unit is not None else None
            request = SpcRequest(
                lu=unit,
                identity=self.identity,
                lun_numbers=lambda: sorted(self._luns),
                take_unit_attention=lambda: (
                    self._take_unit_attention(nexus, number) if number is not None else None
                ),
                luns_reported=lambda: self._clear_luns_changed(nexus),
            )
            return spc(request, cdb)
        assert sbc is not None and unit is not None
        return sbc(unit, cdb, self.identity.max_transfer_bytes)

    def _fail_at_setup(self, plan: CommandPlan, sense: SenseData) -> CommandPlan:
        plan.state = CommandState.COMPLETED
        plan.direction = Direction.NONE
        plan.transfer_length = 0
        plan.result = ScsiResult(
            ScsiStatus.CHECK_CONDITION,
            sense=sense.encode(),
            underflow=plan.expected_length or 0,
        )
        return plan

    def execute(
        self, plan: CommandPlan, data_out: bytes | bytearray | memoryview | None = None
    ) -> ScsiResult:
        """Phase two: run a set-up command and return its status, sense and
        data-in (``target_execute_cmd`` → ``fd_execute_rw`` …
        ``target_complete_cmd_with_length``).

        ``data_out`` is the write data of a DATA_OUT command — exactly
        ``plan.transfer_length`` bytes (None will do for zero) — and None
        otherwise. Writes are in the image (``pwrite``) when this returns,
        and durable (``fsync``) if the command had FUA or the backstore's
        write cache is off; a SYNCHRONIZE CACHE makes all earlier writes
        durable. A plan aborted by task management returns TASK ABORTED
        with ``aborted`` set and does no I/O; one that failed at setup
        returns that result. Each plan is executed once; anything else is a
        :class:`ScsiUsageError`.
        """
        if not isinstance(plan, CommandPlan) or plan._target is not self:
            raise ScsiUsageError(f"{plan!r} was not set up by this target")
        if plan._executed or plan.state is CommandState.RELEASED:
            raise ScsiUsageError(f"{plan!r} was already executed or released")
        if plan.state is CommandState.ABORTED:
            plan._executed = True
            return ScsiResult(ScsiStatus.TASK_ABORTED, aborted=True)
        if plan.result is not None:
            plan._executed = True
            return plan.result
        view = self._check_data_out(plan, data_out)
        parsed = plan._parsed
        assert parsed is not None
        plan._executed = True
        self._forget(plan)
        expected = plan.cdb_length if plan.expected_length is None else plan.expected_length
        try:
            data = parsed.run(view, plan.transfer_length)
        except CheckCondition as cc:
            moved = plan.transfer_length if plan.direction is Direction.DATA_OUT else 0
            result = ScsiResult(
                ScsiStatus.CHECK_CONDITION, sense=cc.sense.encode(), underflow=expected - moved
            )
        except OSError:
            sense = SenseData.of(SenseKey.HARDWARE_ERROR, AdditionalSense.INTERNAL_TARGET_FAILURE)
            result = ScsiResult(ScsiStatus.CHECK_CONDITION, sense=sense.encode())
        else:
            # What the command would move: all of a READ (whose runner stopped
            # at the transport's limit), the parameter data up to the
            # allocation length, all of a WRITE, nothing for NONE.
            if plan.direction is Direction.DATA_OUT or parsed.data_cdb:
                wanted = plan.cdb_length
            elif plan.direction is Direction.DATA_IN:
                wanted = min(len(data), plan.cdb_length)
            else:
                wanted = 0
            moved = min(wanted, expected)
            if len(data) > moved:
                data = data[:moved]
            result = ScsiResult(
                ScsiStatus.GOOD,
                data_in=data,
                underflow=max(expected - wanted, 0),
                overflow=max(wanted - expected, 0),
            )
        plan.state = CommandState.COMPLETED
        plan.result = result
        return result

    def _check_data_out(
        self, plan: CommandPlan, data_out: bytes | bytearray | memoryview | None
    ) -> memoryview | None:
        if plan.direction is not Direction.DATA_OUT:
            if data_out is not None and len(data_out):
                raise ScsiUsageError(f"{plan!r} takes no data-out")
            return None
        if data_out is None:
            if plan.transfer_length == 0:
                return memoryview(b"")
            raise ScsiUsageError(f"{plan!r} needs {plan.transfer_length} bytes of data-out")
        view = memoryview(data_out).cast("B")
        if len(view) != plan.transfer_length:
            raise ScsiUsageError(
                f"{plan!r} needs {plan.transfer_length} bytes of data-out, got {len(view)}"
            )
        return view

    def release(self, plan: CommandPlan) -> None:
        """Give up a set-up command without executing it — the transport
        could not fetch its data, or its connection went away (LIO:
        ``transport_generic_free_cmd``). Releasing a finished plan does
        nothing."""
        if not isinstance(plan, CommandPlan) or plan._target is not self:
            raise ScsiUsageError(f"{plan!r} was not set up by this target")
        if plan.state is CommandState.PENDING:
            self._forget(plan)
            plan.state = CommandState.RELEASED

    def outstanding(self, nexus: Nexus) -> tuple[CommandPlan, ...]:
        """The commands ``nexus`` has set up and not yet had executed,
        aborted or released (its task set)."""
        state = self._nexuses.get(nexus)
        return tuple(state.tasks.values()) if state else ()

    def _forget(self, plan: CommandPlan) -> None:
        state = self._nexuses.get(plan.nexus)
        if state is not None:
            state.tasks.pop(plan.tag if plan.tag is not None else plan, None)

    def _abort(self, state: _NexusState, match: _PlanFilter) -> tuple[CommandPlan, ...]:
        aborted = tuple(plan for plan in state.tasks.values() if match(plan))
        for plan in aborted:
            self._forget(plan)
            plan.state = CommandState.ABORTED
        return aborted

    # --- task management ------------------------------------------------------------------

    def task_management(
        self,
        nexus: Nexus,
        function: TmFunction,
        lun: int | bytes | bytearray | memoryview = 0,
        *,
        tag: int | None = None,
    ) -> TmfResult:
        """Run task management function ``function`` received on ``nexus``
        (``core_tmr_alloc_req`` + ``target_tmr_work``): dispatches to the
        methods below; ABORT TASK and QUERY TASK need ``tag``."""
        if function in (TmFunction.ABORT_TASK, TmFunction.QUERY_TASK):
            if tag is None:
                raise ScsiUsageError(f"{function.value} needs a tag")
            if function is TmFunction.ABORT_TASK:
                return self.abort_task(nexus, lun, tag)
            return self.query_task(nexus, lun, tag)
        handlers = {
            TmFunction.ABORT_TASK_SET: self.abort_task_set,
            TmFunction.CLEAR_TASK_SET: self.clear_task_set,
            TmFunction.LOGICAL_UNIT_RESET: self.lun_reset,
            TmFunction.CLEAR_ACA: self.clear_aca,
        }
        if function is TmFunction.I_T_NEXUS_RESET:
            return self.it_nexus_reset(nexus)
        if function not in handlers:
            raise ScsiUsageError(f"{function!r} is not a task management function")
        return handlers[function](nexus, lun)

    def _tmf_lun(self, nexus: Nexus, lun: int | bytes | bytearray | memoryview) -> int | None:
        self._state(nexus)
        number = lun_from_any(lun)
        return number if number is not None and number in self._luns else None

    def abort_task(
        self, nexus: Nexus, lun: int | bytes | bytearray | memoryview, tag: int
    ) -> TmfResult:
        """ABORT TASK (``core_tmr_abort_task``): abort the command ``tag`` of
        this nexus on this LUN if it is outstanding. The response is
        FUNCTION COMPLETE either way (SAM-5; ``aborted`` tells whether the
        task existed — iSCSI reports "task does not exist" from it)."""
        number = self._tmf_lun(nexus, lun)
        if number is None:
            return TmfResult(TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER)
        state = self._nexuses[nexus]
        plan = state.tasks.get(tag)
        if plan is None or plan.lun != number:
            return TmfResult(TmfResponse.FUNCTION_COMPLETE)
        return TmfResult(TmfResponse.FUNCTION_COMPLETE, self._abort(state, lambda p: p is plan))

    def query_task(
        self, nexus: Nexus, lun: int | bytes | bytearray | memoryview, tag: int
    ) -> TmfResult:
        """QUERY TASK: FUNCTION SUCCEEDED if command ``tag`` of this nexus
        is outstanding on this LUN, else FUNCTION COMPLETE."""
        number = self._tmf_lun(nexus, lun)
        if number is None:
            return TmfResult(TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER)
        plan = self._nexuses[nexus].tasks.get(tag)
        found = plan is not None and plan.lun == number
        return TmfResult(TmfResponse.FUNCTION_SUCCEEDED if found else TmfResponse.FUNCTION_COMPLETE)

    def abort_task_set(
        self, nexus: Nexus, lun: int | bytes | bytearray | memoryview = 0
    ) -> TmfResult:
        """ABORT TASK SET: abort this nexus's outstanding commands on the LUN."""
        number = self._tmf_lun(nexus, lun)
        if number is None:
            return TmfResult(TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER)
        aborted = self._abort(self._nexuses[nexus], lambda p: p.lun == number)
        return TmfResult(TmfResponse.FUNCTION_COMPLETE, aborted)

    def clear_task_set(
        self, nexus: Nexus, lun: int | bytes | bytearray | memoryview = 0
    ) -> TmfResult:
        """CLEAR TASK SET: abort every nexus's outstanding commands on the
        LUN; each other nexus that lost commands gets COMMANDS CLEARED BY
        ANOTHER INITIATOR (SAM-5, TAS 0)."""
        number = self._tmf_lun(nexus, lun)
        if number is None:
            return TmfResult(TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER)
        aborted: list[CommandPlan] = []
        for other, state in self._nexuses.items():
            lost = self._abort(state, lambda p: p.lun == number)
            aborted += lost
            if lost and other != nexus:
                self._add_unit_attention(
                    other, number, AdditionalSense.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR
                )
        return TmfResult(TmfResponse.FUNCTION_COMPLETE, tuple(aborted))

    def lun_reset(self, nexus: Nexus, lun: int | bytes | bytearray | memoryview = 0) -> TmfResult:
        """LOGICAL UNIT RESET (``core_tmr_lun_reset``): abort every nexus's
        outstanding commands on the LUN and establish a unit attention
        BUS DEVICE RESET FUNCTION OCCURRED (29h/03h, as SAM-5 and LIO do)
        for every other known nexus; the next command from each of them to
        the LUN, other than INQUIRY, REPORT LUNS and REQUEST SENSE, reports
        it once."""
        number = self._tmf_lun(nexus, lun)
        if number is None:
            return TmfResult(TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER)
        aborted: list[CommandPlan] = []
        for other, state in self._nexuses.items():
            aborted += self._abort(state, lambda p: p.lun == number)
            if other != nexus:
                self._add_unit_attention(
                    other, number, AdditionalSense.BUS_DEVICE_RESET_FUNCTION_OCCURRED
                )
        return TmfResult(TmfResponse.FUNCTION_COMPLETE, tuple(aborted))

    def it_nexus_reset(self, nexus: Nexus) -> TmfResult:
        """I_T NEXUS RESET: abort the nexus's outstanding commands on every
        LUN and give it I_T NEXUS LOSS OCCURRED on every LUN (SAM-5)."""
        state = self._state(nexus)
        aborted = self._abort(state, lambda p: True)
        for number in self._luns:
            self._add_unit_attention(nexus, number, AdditionalSense.I_T_NEXUS_LOSS_OCCURRED)
        return TmfResult(TmfResponse.FUNCTION_COMPLETE, aborted)

    def clear_aca(self, nexus: Nexus, lun: int | bytes | bytearray | memoryview = 0) -> TmfResult:
        """CLEAR ACA: rejected, this target never establishes ACA (NACA in a
        CDB is an invalid field)."""
        if self._tmf_lun(nexus, lun) is None:
            return TmfResult(TmfResponse.INCORRECT_LOGICAL_UNIT_NUMBER)
        return TmfResult(TmfResponse.FUNCTION_REJECTED)

    def __repr__(self) -> str:
        return (
            f"ScsiTarget({self.identity.vendor!r}, luns={sorted(self._luns)}, "
            f"nexuses={len(self._nexuses)})"
        )
