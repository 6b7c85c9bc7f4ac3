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
"""
import gzip
import hashlib
import json
import os
import stat
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


def main(argv):
    if len(argv) >= 2 and argv[1] == "cpio" and len(argv) == 5:
        cpio(argv[2], argv[3], int(argv[4]))
    elif len(argv) == 4 and argv[1] == "manifest":
        manifest(argv[2], argv[3])
    elif len(argv) in (3, 4) and argv[1] == "verify":
        return 0 if verify(argv[2], argv[3] if len(argv) == 4 else None) else 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
