"""The capacity of the disk behind a block initiator, as ``sd`` keeps it.

Kernel counterpart: ``drivers/scsi/sd.c`` — ``struct scsi_disk``'s
``capacity`` and ``sector_size``, set by ``sd_read_capacity`` when the disk
is probed or revalidated and read by every block I/O after. Both block
initiators (SRP and iSER) share it; each reads the capacity its own way.
"""

from __future__ import annotations

__all__ = ["SdCapacity"]


class SdCapacity:
    """The block count and block size of the initiator's LUN, read once by
    :meth:`read_capacity` (which a subclass supplies) and kept for the
    I/O that follows."""

    lun: int
    _capacity: tuple[int, int] | None

    def read_capacity(self, lun: int | None = None) -> tuple[int, int]:
        """``(blocks, block_size)`` of ``lun`` (the initiator's own when
        ``None``), read from the target; it calls :meth:`_keep_capacity`."""
        raise NotImplementedError

    def _keep_capacity(self, lun: int | None, blocks: int, size: int) -> None:
        """Remember what READ CAPACITY said of the initiator's own LUN (sd
        keeps one capacity per disk; another LUN's is only returned)."""
        if lun is None or lun == self.lun:
            self._capacity = (blocks, size)

    def _known_capacity(self) -> tuple[int, int]:
        cap = self._capacity
        if cap is None:
            self.read_capacity()
            cap = self._capacity
            assert cap is not None  # read_capacity() kept it
        return cap

    @property
    def capacity(self) -> int:
        """The number of blocks (read once)."""
        return self._known_capacity()[0]

    @property
    def block_size(self) -> int:
        """The logical block size (read once)."""
        return self._known_capacity()[1]
