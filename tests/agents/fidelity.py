"""A test agent: a workspace with everything a file tree can hold, and its digest.

Run as ``python3 -c <this file's text> COMMAND`` in the agent image:

- ``build``: make the tree in the workspace, then print its digest;
- ``build-and-wait``: the same, then run until stopped (at most a minute);
- ``digest``: print the workspace's digest and whether its links resolve;
- ``agent``: as a task. Attempt 1 builds, prints the digest, checkpoints and exits 3; a
  resumed attempt prints the digest of what was restored and exits 0.

The digest walks the tree with ``os.lstat``: per entry its path (bytes), type, mode
(setuid/setgid/sticky bits included), owner, mtime, size, content SHA-256, symlink target
(bytes) and hard-link group (the first path of its inode, in walk order). mtimes count in
whole seconds, rounded to the nearest: that is what Podman's archive keeps (Go's tar
writer rounds; it writes no PAX sub-second times). Printed as ``ROW <json>`` lines and a
``DIGEST <sha256>`` line.
"""

import hashlib
import json
import os
import stat
import sys
import time

WS = os.environ.get("VIGIL_WORKSPACE", "/workspace")


def raw(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


LONG_DIR = "/".join(f"level{i:02d}-" + "d" * 40 for i in range(7))  # 7 x 48 bytes
NAME_MAX = "n" * 251 + ".txt"  # 255 bytes, the longest name ext4 takes
LATIN1 = raw(b"caf\xe9-latin1.txt")  # not UTF-8
BAD_DIR = raw(b"dir-\xff\xfe")
DIR_MODES = {"d751": 0o751, "private-empty": 0o700, "setgid-dir": 0o2775, "sticky-dir": 0o1777}


def write(path: str, data: bytes, mode: int = 0o644) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


def build(root: str) -> None:
    os.chdir(root)
    write("plain.txt", b"hello\n")
    write("empty-file", b"")
    write("run.sh", b"#!/bin/sh\necho hi\n", 0o755)
    write("secret", b"s3cret", 0o600)
    write("readonly", b"ro", 0o444)
    write("setuid-tool", b"#!/bin/sh\n", 0o4755)
    os.mkdir("d751")
    write("d751/inner", b"inner")
    os.makedirs("empty/nested-empty")
    os.mkdir("private-empty")
    os.mkdir("setgid-dir")
    os.mkdir("sticky-dir")
    os.mkfifo("a-fifo", 0o640)
    # Paths over 100 bytes (ustar's name field) and over 255 (its prefix + name).
    over100 = "L" * 60 + "/" + "M" * 60
    os.makedirs(over100)
    write(over100 + "/file", b"over 100")
    os.makedirs(LONG_DIR)
    write(LONG_DIR + "/deep-file", b"deep")
    write(NAME_MAX, b"NAME_MAX")
    write(LATIN1, b"latin-1 name")
    os.mkdir(BAD_DIR)
    write(BAD_DIR + "/" + raw(b"\x80\x81"), b"bytes all the way")
    write("unicodé-ü", b"utf-8 name")
    # Hard links: same directory, across directories, to and from long paths and names.
    os.link("plain.txt", "hard-same-dir")
    os.link("plain.txt", "d751/hard-other-dir")
    os.link(LONG_DIR + "/deep-file", "hard-to-deep")
    os.link(NAME_MAX, LONG_DIR + "/hard-to-name-max")
    os.link(LATIN1, BAD_DIR + "/hard-to-latin1")
    # Symlinks: relative, absolute into the workspace, to a directory, upwards, dangling,
    # and one whose target is over 100 bytes.
    os.symlink("plain.txt", "rel-link")
    os.symlink("/workspace/plain.txt", "abs-link")
    os.symlink("d751", "dir-link")
    os.symlink("../plain.txt", "d751/up-link")
    os.symlink("nowhere", "dangling")
    os.symlink(LONG_DIR + "/deep-file", "long-target-link")
    # Directory modes last (root writes into a 0751 directory anyway, but say it plainly).
    for path, mode in DIR_MODES.items():
        os.chmod(path, mode)
    # mtimes with nanoseconds, directories after their contents (writing a directory's
    # entries moves its mtime), deepest first.
    t = 1_600_000_000_000_000_000
    entries = sorted((os.path.join(d, n) for d, ds, fs in os.walk(".") for n in ds + fs),
                     key=lambda p: -p.count("/"))
    for i, path in enumerate(entries):
        ns = t + i * 1_234_567_891
        os.utime(path, ns=(ns, ns), follow_symlinks=False)


def rows(root: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    groups: dict[int, str] = {}
    broot = root.encode()
    for dirpath, dirnames, filenames in os.walk(broot):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, broot).hex()
            st = os.lstat(path)
            row: dict[str, object] = {
                "path": rel, "type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)),
                "uid": st.st_uid, "gid": st.st_gid,
                "mtime_s": (st.st_mtime_ns + 500_000_000) // 1_000_000_000,
            }
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    row["sha256"] = hashlib.sha256(fh.read()).hexdigest()
                row["size"] = st.st_size
                row["link_group"] = groups.setdefault(st.st_ino, rel) if st.st_nlink > 1 else None
            elif stat.S_ISLNK(st.st_mode):
                row["target"] = os.readlink(path).hex()
            out.append(row)
    return out


def resolves(root: str) -> dict[str, object]:
    """Symlinks used as links, inside this container."""
    os.chdir(root)
    with open("abs-link", "rb") as a, open("rel-link", "rb") as r, \
            open("dir-link/inner", "rb") as d, open("d751/up-link", "rb") as u:
        return {"abs": a.read().decode(), "rel": r.read().decode(), "dir": d.read().decode(),
                "up": u.read().decode(), "abs_real": os.path.realpath("abs-link"),
                "dangling": os.path.exists("dangling")}


def report(root: str) -> None:
    found = rows(root)
    for row in found:
        print("ROW " + json.dumps(row, sort_keys=True), flush=True)
    digest = hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()
    print(f"DIGEST {digest} {len(found)}", flush=True)


def main(command: str) -> int:
    if command in ("build", "build-and-wait"):
        build(WS)
        report(WS)
        if command == "build-and-wait":
            time.sleep(60)  # exported while running, then stopped by the test
        return 0
    if command == "digest":
        report(WS)
        print("RESOLVES " + json.dumps(resolves(WS), sort_keys=True), flush=True)
        return 0
    import vigil_agent as vigil

    if vigil.resumed():
        report(WS)
        print("RESOLVES " + json.dumps(resolves(WS), sort_keys=True), flush=True)
        return 0
    build(WS)
    report(WS)
    print("checkpoint=" + ("ok" if vigil.checkpoint({"tree": True}) else "failed"), flush=True)
    return 3  # a failure: the retry resumes from the checkpoint


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "agent"))
