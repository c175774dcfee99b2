"""Block devices of the node: kernel dev_t → name, and whether a device is virtio.

The block probe keys requests by the kernel's dev_t (``MKDEV(major, minor) =
major << 20 | minor``, not the user-space encoding); the device's place in
``/sys/devices`` says whether it sits on a virtio bus (virtio-blk, or a disk
behind virtio-scsi), i.e. whether its request time is l2.virtio_io.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MINOR_BITS = 20


def kernel_dev_t(major: int, minor: int) -> int:
    """The in-kernel dev_t encoding tracepoints report (``MKDEV``)."""
    return (major << MINOR_BITS) | minor


def split_kernel_dev_t(dev: int) -> tuple[int, int]:
    """Inverse of :func:`kernel_dev_t`."""
    return dev >> MINOR_BITS, dev & ((1 << MINOR_BITS) - 1)


@dataclass(frozen=True, slots=True)
class BlockDevice:
    """One block device (disk or partition).

    Attributes:
        major, minor: device numbers.
        name: kernel name (``vda``, ``vda1``, ``nvme0n1``).
        virtio: whether the device hangs below a virtio device.
        partition: whether it is a partition of another device.
    """

    major: int
    minor: int
    name: str
    virtio: bool
    partition: bool = False

    @property
    def dev_t(self) -> int:
        return kernel_dev_t(self.major, self.minor)


def _is_virtio(real_path: str, sys_root: str) -> bool:
    # /sys/devices/pci0000:00/0000:00:04.0/virtio2/block/vda: a "virtioN" hop on the way down.
    rel = os.path.relpath(real_path, os.path.join(sys_root, "devices"))
    return any(part.startswith("virtio") and part[6:].isdigit() for part in rel.split(os.sep))


def list_block_devices(sys_root: str = "/sys") -> list[BlockDevice]:
    """Every block device listed in ``<sys_root>/dev/block``.

    Args:
        sys_root: where sysfs is mounted.

    Returns:
        Devices sorted by (major, minor); unreadable entries are skipped.
    """
    base = os.path.join(sys_root, "dev", "block")
    out: list[BlockDevice] = []
    try:
        entries = os.listdir(base)
    except OSError as exc:
        logger.warning("cannot list %s: %s", base, exc)
        return out
    for entry in entries:
        try:
            major_s, minor_s = entry.split(":", 1)
            major, minor = int(major_s), int(minor_s)
        except ValueError:
            continue
        link = os.path.join(base, entry)
        real = os.path.realpath(link)
        name = os.path.basename(real)
        partition = os.path.exists(os.path.join(real, "partition"))
        out.append(BlockDevice(major, minor, name, _is_virtio(real, sys_root), partition))
    out.sort(key=lambda d: (d.major, d.minor))
    return out


def device_names(sys_root: str = "/sys") -> dict[int, str]:
    """Kernel dev_t → device name, for labels."""
    return {d.dev_t: d.name for d in list_block_devices(sys_root)}


def virtio_dev_ts(sys_root: str = "/sys") -> list[int]:
    """Kernel dev_t of every virtio block device (disks and their partitions)."""
    return [d.dev_t for d in list_block_devices(sys_root) if d.virtio]
