#!/usr/bin/env python3
"""Helpers for scripts/build-guest-image (standard library only).

  imgtool.py cpio ROOTDIR OUT.gz EPOCH   deterministic gzip'd newc initramfs,
                                          owned by root, with /dev/console and
                                          /dev/null nodes (no root needed)
  imgtool.py manifest DIR JSON-FIELDS     write DIR/manifest.json: JSON-FIELDS
                                          (a JSON object) plus "files" with the
                                          sha256 and size of every listed file
  imgtool.py verify DIR [INPUTS-SHA256]   exit 0 iff DIR/manifest.json lists
                                          files that all exist with their size
                                          and sha256 (and the inputs hash matches)
  imgtool.py vmlinux BZIMAGE OUT          the kernel ELF inside a bzImage, for
                                          QEMU's PVH boot (refused without the
                                          PVH entry note); lz4/zstd payloads need
                                          the lz4/zstd commands
"""
import gzip
import hashlib
import json
import lzma
import os
import stat
import struct
import subprocess
import sys


def cpio(root, out, epoch):
    entries = []  # (name, mode, data, rdev)
    dirs_seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        names = sorted(dirnames + filenames)
        if rel != ".":
            dirs_seen.add(rel)
        for n in names:
            full = os.path.join(dirpath, n)
            name = os.path.normpath(os.path.join(rel, n))
            st = os.lstat(full)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entries.append((name, stat.S_IFLNK | 0o777, os.readlink(full).encode(), 0))
            elif stat.S_ISDIR(st.st_mode):
                entries.append((name, stat.S_IFDIR | perm, b"", 0))
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    entries.append((name, stat.S_IFREG | perm, f.read(), 0))
            else:
                raise SystemExit(f"imgtool: unsupported file type: {full}")
    if "dev" not in dirs_seen:
        entries.append(("dev", stat.S_IFDIR | 0o755, b"", 0))
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)))
    entries.append(("dev/null", stat.S_IFCHR | 0o666, b"", (1, 3)))
    entries.sort(key=lambda e: e[0])

    def pad4(n):
        return (4 - n % 4) % 4

    buf = bytearray()
    ino = 1
    for name, mode, data, rdev in entries + [("TRAILER!!!", 0, b"", 0)]:
        bname = name.encode() + b"\0"
        rmaj, rmin = rdev if rdev else (0, 0)
        nlink = 2 if stat.S_ISDIR(mode) else 1
        if name == "TRAILER!!!":
            nlink, ino_v, mtime = 1, 0, 0
        else:
            ino_v, mtime = ino, epoch
            ino += 1
        fields = [ino_v, mode, 0, 0, nlink, mtime, len(data), 0, 0, rmaj, rmin, len(bname), 0]
        buf += b"070701" + b"".join(b"%08X" % v for v in fields)
        buf += bname + b"\0" * pad4(110 + len(bname))
        buf += data + b"\0" * pad4(len(data))
    with open(out, "wb") as f:
        # mtime=0 and no file name in the gzip header: reproducible output
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
            gz.write(bytes(buf))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(d, fields_json):
    m = json.loads(fields_json)
    names = m.pop("file_list")
    m["files"] = [
        {"path": n, "sha256": sha256_file(os.path.join(d, n)), "size": os.path.getsize(os.path.join(d, n))}
        for n in names
    ]
    tmp = os.path.join(d, ".manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(m, f, indent=2)
        f.write("\n")
    os.rename(tmp, os.path.join(d, "manifest.json"))


def verify(d, inputs=None):
    try:
        m = json.load(open(os.path.join(d, "manifest.json")))
        if inputs is not None and m.get("build_inputs_sha256") != inputs:
            return False
        listed = {f["path"] for f in m["files"]}
        for key in ("kernel", "initrd", "disk"):
            if m.get(key) not in listed:
                return False
        for f in m["files"]:
            p = os.path.join(d, f["path"])
            if "/" in f["path"] or os.path.getsize(p) != f["size"] or sha256_file(p) != f["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


# XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit entry point QEMU's PVH boot jumps to
PVH_NOTE_TYPE = 18


def vmlinux(bzimage, out):
    """Why: QEMU keeps a heap copy of a bzImage for its firmware config device for the
    guest's whole life (13.5 MiB for Debian's cloud kernel), but maps an ELF kernel
    from its file and boots it through its PVH entry (docs/vmm.md "Host memory per
    guest"). The ELF is the bzImage's payload, decompressed."""
    with open(bzimage, "rb") as f:
        d = f.read()
    if d[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", d, 0x206)[0] < 0x208:
        raise SystemExit(f"imgtool: {bzimage} is not a bzImage of boot protocol 2.08 or later")
    setup_sects = d[0x1F1] or 4
    offset, length = struct.unpack_from("<II", d, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = d[start : start + length]
    if payload[:2] == b"\x1f\x8b":
        elf = gzip.decompress(payload)
    elif payload[:6] == b"\xfd7zXZ\x00":
        # one stream, then the decompressed size the kernel's build appends
        elf = lzma.LZMADecompressor().decompress(payload)
    elif payload[:4] in (b"\x02\x21\x4c\x18", b"\x28\xb5\x2f\xfd"):
        # LZ4 (the kernel's legacy frame) or zstd: not in Python's standard library; the
        # kernel's build appends the decompressed size (4 bytes), which lz4 would read
        # as one more block
        tool = "lz4" if payload[0] == 0x02 else "zstd"
        elf = subprocess.run([tool, "-dc"], input=payload[:-4], capture_output=True, check=True).stdout
    else:
        raise SystemExit(f"imgtool: {bzimage}: unknown payload compression {payload[:6].hex()}")
    if len(elf) != struct.unpack("<I", payload[-4:])[0]:
        raise SystemExit(f"imgtool: {bzimage}: the payload did not decompress to its recorded size")
    if elf[:5] != b"\x7fELF\x02" or struct.unpack_from("<H", elf, 0x12)[0] != 62:
        raise SystemExit(f"imgtool: {bzimage}: the payload is not an x86-64 ELF")
    if not has_pvh_entry(elf):
        raise SystemExit(f"imgtool: {bzimage}: the kernel has no PVH entry (CONFIG_PVH)")
    with open(out, "wb") as f:
        f.write(elf)


def has_pvh_entry(elf):
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == PVH_NOTE_TYPE:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def main(argv):
    if len(argv) >= 2 and argv[1] == "cpio" and len(argv) == 5:
        cpio(argv[2], argv[3], int(argv[4]))
    elif len(argv) == 4 and argv[1] == "manifest":
        manifest(argv[2], argv[3])
    elif len(argv) == 4 and argv[1] == "vmlinux":
        vmlinux(argv[2], argv[3])
    elif len(argv) in (3, 4) and argv[1] == "verify":
        return 0 if verify(argv[2], argv[3] if len(argv) == 4 else None) else 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
