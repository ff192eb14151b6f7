"""The first process in the private libvirtd's namespaces: mounts, then libvirtd.

Started as `nsenter --net=NETNS unshare --mount --propagation private python3 -I -S nsexec.py
LIBVIRTD CONFIG PIDFILE SRC TARGET [SRC TARGET ...]` (see libvirtd.py for why the namespaces).
Every path travels as its own argv entry, to `mount` and to libvirtd alike: no shell ever parses
one, so a state directory with a space, a quote or `$(...)` in its name is just a name. Runs on
the standard library alone (`-I -S`: no site packages, no environment variables, no current
directory). The process execs libvirtd, so libvirtd keeps the pid `nsenter` started with.
"""
import os
import subprocess
import sys

CGROUP = "/sys/fs/cgroup"
SYSFS = "/sys"


def mountinfo() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount in this mount namespace."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            point = fields.split()[4]
            # the kernel escapes space, tab, newline and backslash as octal
            for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(code, char)
            found.append((point, rest.split()[0]))
    return found


def main(argv: list[str]) -> None:
    libvirtd, config, pid_file, *pairs = argv
    if len(pairs) % 2:
        sys.exit("nsexec: bind mounts come in SOURCE TARGET pairs")
    # This mount namespace is a private copy of the host's, with every namespace file bound
    # there (other stacks' network namespaces, `ip netns` handles): drop them here, or a copy
    # would keep another stack's network namespace alive after that stack removed it.
    for point, fstype in reversed(mountinfo()):
        if fstype == "nsfs":
            subprocess.run(["umount", "-l", "--", point], check=False)
    for source, target in zip(pairs[::2], pairs[1::2], strict=True):
        subprocess.run(["mount", "--bind", "--", source, target], check=True)
    # hide cgroups from libvirtd, so reconnecting to guests does not kill them (libvirtd.py)
    if os.path.isdir(CGROUP) and any(point == CGROUP for point, _ in mountinfo()):
        subprocess.run(["umount", "-l", "--", CGROUP], check=True)
    # a sysfs mounted from inside the stack's network namespace shows that namespace's network
    # devices under /sys/class/net (libvirt reads and writes its bridge there), not the host's
    subprocess.run(["mount", "-t", "sysfs", "--", "sysfs", SYSFS], check=True)
    os.execv(libvirtd, [libvirtd, "--config", config, "--pid-file", pid_file])


if __name__ == "__main__":
    main(sys.argv[1:])
