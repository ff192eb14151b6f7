"""The first process of the local node (node.py): containerd and the kubelet, in the node's namespaces.

Started as `nsenter --net=NETNS unshare --mount --propagation private -- python3 -I -S nodeexec.py
PLAN.json`. The plan (written by node.py) names the cgroups to join, the kernel settings to show
the kubelet and the two commands. In this private mount namespace:
- every namespace file bound from the host's is dropped (as nsexec.py does for libvirtd);
- the host directories containerd and CNI use whatever they are told (/run/containerd,
  /var/lib/cni) are the node's own directories, bound over them;
- the kubelet's kernel settings (vm.overcommit_memory, kernel.panic, ...) are files bound over
  their /proc/sys entries, holding the values it wants: the kubelet finds them set and writes
  nothing, so the machine's own settings stay as they were;
- containerd, its shims, the pods' mounts and the kubelet's volumes live and die here.
containerd starts first; the kubelet once containerd's socket answers. When either exits, or on
SIGTERM, both are stopped and this process exits. Standard library only; no shell.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves the script's dir out
from nsexec import mountinfo


def join_cgroups(cgroup_procs: list[str]) -> None:
    for procs in cgroup_procs:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))


def show_kernel_settings(settings: dict[str, str], directory: str) -> None:
    for key, value in settings.items():
        proc_path = "/proc/sys/" + key.replace(".", "/")
        with open(proc_path) as f:
            if f.read().strip() == value:
                continue
        shown = os.path.join(directory, key)
        with open(shown, "w") as f:
            f.write(value + "\n")
        subprocess.run(["mount", "--bind", "--", shown, proc_path], check=True)


def socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def main(plan_file: str) -> int:
    with open(plan_file) as f:
        plan = json.load(f)
    for point, fstype in reversed(mountinfo()):
        if fstype == "nsfs":
            subprocess.run(["umount", "-l", "--", point], check=False)
    for source, target in plan["private_dirs"]:
        subprocess.run(["mount", "--bind", "--", source, target], check=True)
    join_cgroups(plan["cgroup_procs"])
    show_kernel_settings(plan["kernel_settings"], plan["kernel_settings_dir"])

    children: list[subprocess.Popen] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with open(plan["containerd_log"], "ab") as log:
        children.append(subprocess.Popen(plan["containerd"], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 30
    while not socket_answers(plan["containerd_socket"]):
        if stopping or children[0].poll() is not None or time.monotonic() > deadline:
            stop()
            return 1
        time.sleep(0.1)
    with open(plan["kubelet_log"], "ab") as log:
        children.append(subprocess.Popen(plan["kubelet"], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT))
    while all(child.poll() is None for child in children):
        time.sleep(0.2)
    stop()
    deadline = time.monotonic() + 15
    while any(child.poll() is None for child in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait()
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
