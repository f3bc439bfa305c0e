"""Page frames, zones and allocation flags (``struct page``, ``enum
zone_type``, ``gfp_t``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from softrdma.memory.layout import PAGE_SHIFT, PhysAddr

if TYPE_CHECKING:
    from softrdma.memory.host import Host


class Zone(enum.Enum):
    """``enum zone_type``: where a page frame sits in physical memory."""

    DMA32 = "DMA32"
    NORMAL = "Normal"
    HIGHMEM = "HighMem"


class Gfp(enum.IntFlag):
    """Allocation flags (``gfp_t``). ``GFP_KERNEL`` is the empty set."""

    DMA32 = 1  # __GFP_DMA32: only ZONE_DMA32
    HIGHMEM = 2  # __GFP_HIGHMEM: ZONE_HIGHMEM allowed (preferred)
    ZERO = 4  # __GFP_ZERO: zero the memory


GFP_KERNEL = Gfp(0)
GFP_DMA32 = Gfp.DMA32
GFP_HIGHUSER = Gfp.HIGHMEM


def zonelist(gfp: Gfp) -> tuple[Zone, ...]:
    """The zones an allocation may use, preferred first (``gfp_zone`` and
    the fallback order of the node's zonelist)."""
    if gfp & Gfp.DMA32:
        return (Zone.DMA32,)
    if gfp & Gfp.HIGHMEM:
        return (Zone.HIGHMEM, Zone.NORMAL, Zone.DMA32)
    return (Zone.NORMAL, Zone.DMA32)


@dataclass(frozen=True, slots=True)
class Page:
    """A page frame of one host (``struct page``), named by its pfn.

    Pages are values: two ``Page`` objects for the same frame compare
    equal. Ask the host for its kernel address (``page_address``), which
    is None for a highmem page that is not kmapped.
    """

    host: Host
    pfn: int

    @property
    def phys(self) -> PhysAddr:
        """``page_to_phys``."""
        return PhysAddr(self.pfn << PAGE_SHIFT)

    @property
    def zone(self) -> Zone:
        """``page_zone``."""
        return self.host.pfn_zone(self.pfn)

    @property
    def is_highmem(self) -> bool:
        """``PageHighMem``: no permanent kernel mapping."""
        return self.pfn >= self.host.lowmem_pfn

    def __add__(self, n: int) -> Page:
        """``nth_page``: the frame ``n`` pages further on."""
        return self.host.pfn_to_page(self.pfn + n)

    def __repr__(self) -> str:
        return f"Page({self.host.name}, pfn={self.pfn:#x})"
