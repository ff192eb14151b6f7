"""The first process in the private libvirtd's mount namespace: bind mounts, then libvirtd.

Started as `unshare --mount --propagation private python3 -I -S nsexec.py LIBVIRTD CONFIG PIDFILE
SRC TARGET [SRC TARGET ...]` (see libvirtd.py for why the namespace). Every path travels as its
own argv entry, to `mount` and to libvirtd alike: no shell ever parses one, so a state
directory with a space, a quote or `$(...)` in its name is just a name. Runs on the standard
library alone (`-I -S`: no site packages, no environment variables, no current directory).
The process execs libvirtd, so libvirtd keeps the pid `unshare` started with.
"""
import os
import subprocess
import sys

CGROUP = "/sys/fs/cgroup"


def mounted(target: str) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1:2] == [target] for line in mounts)


def main(argv: list[str]) -> None:
    libvirtd, config, pid_file, *pairs = argv
    if len(pairs) % 2:
        sys.exit("nsexec: bind mounts come in SOURCE TARGET pairs")
    for source, target in zip(pairs[::2], pairs[1::2], strict=True):
        subprocess.run(["mount", "--bind", "--", source, target], check=True)
    # hide cgroups from libvirtd, so reconnecting to guests does not kill them (libvirtd.py)
    if os.path.isdir(CGROUP) and mounted(CGROUP):
        subprocess.run(["umount", "-l", "--", CGROUP], check=True)
    os.execv(libvirtd, [libvirtd, "--config", config, "--pid-file", pid_file])


if __name__ == "__main__":
    main(sys.argv[1:])
