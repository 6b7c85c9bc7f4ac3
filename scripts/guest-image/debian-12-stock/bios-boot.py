#!/usr/bin/env python3
"""Make a raw GPT disk BIOS-bootable with GRUB, without a loop device or a mount.

  bios-boot.py DISK BOOT_IMG CORE_IMG BIOS_PART_START_LBA BIOS_PART_SECTORS

What `grub-bios-setup` does for a GPT disk with a BIOS boot partition (GRUB 2.06,
util/setup.c), done on a plain file:
  - core.img (grub-mkimage -O i386-pc) is written, whole, at the start of the BIOS
    boot partition; the block list at the end of its first sector (diskboot.img) is
    pointed at the sectors that follow it (grub-mkimage already filled in the count);
  - boot.img goes into the first 440 bytes of the disk's protective MBR, keeping the
    MBR's BPB area and its disk signature and partition table, with the LBA of
    core.img's first sector in it and the boot drive check replaced by NOPs (as
    grub-bios-setup does for a hard disk).
Offsets: GRUB's include/grub/i386/pc/boot.h and grub-core/boot/i386/pc/diskboot.S.
"""
import struct
import sys

SECTOR = 512
BPB_START, BPB_END = 0x03, 0x5A
KERNEL_SECTOR = 0x5C  # u64 LE: LBA of core.img's first sector
DRIVE_CHECK = 0x66  # 2-byte jump skipped for hard disks
WINDOWS_NT_MAGIC, PART_END = 0x1B8, 0x1FE
# diskboot.img's first block list entry: u64 start, u16 len, u16 segment
BLOCKLIST = SECTOR - 12


def main(disk, boot_img, core_img, start, sectors):
    start, sectors = int(start), int(sectors)
    boot = bytearray(open(boot_img, "rb").read())
    core = bytearray(open(core_img, "rb").read())
    if len(boot) != SECTOR or boot[0x1FE:] != b"\x55\xaa":
        sys.exit(f"bios-boot: {boot_img} is not GRUB's 512-byte boot.img")
    if len(core) % SECTOR:
        core += bytes(SECTOR - len(core) % SECTOR)
    need = len(core) // SECTOR
    if need > sectors:
        sys.exit(f"bios-boot: core.img needs {need} sectors, the BIOS boot partition has {sectors}")
    (count,) = struct.unpack_from("<H", core, BLOCKLIST + 8)
    if count != need - 1:
        sys.exit(f"bios-boot: core.img's block list says {count} sectors, the file has {need - 1} after diskboot")
    struct.pack_into("<Q", core, BLOCKLIST, start + 1)
    with open(disk, "r+b") as f:
        mbr = bytearray(f.read(SECTOR))
        if mbr[0x1FE:] != b"\x55\xaa" or mbr[0x1C2] != 0xEE:
            sys.exit(f"bios-boot: {disk} has no protective MBR (write the GPT first)")
        boot[BPB_START:BPB_END] = mbr[BPB_START:BPB_END]
        boot[WINDOWS_NT_MAGIC:PART_END] = mbr[WINDOWS_NT_MAGIC:PART_END]
        struct.pack_into("<Q", boot, KERNEL_SECTOR, start)
        boot[DRIVE_CHECK : DRIVE_CHECK + 2] = b"\x90\x90"
        f.seek(0)
        f.write(boot)
        f.seek(start * SECTOR)
        f.write(core)


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    main(*sys.argv[1:])
