"""`novalet dev up|down|status|env|exec|image`: the local stack (control plane + private libvirtd
+ a loopback image server).

The daemons are started detached (each in its own session, pids in the state dir), so they
outlive the command; `dev down` stops exactly those processes. The guests' network exists only
inside the stack's network namespace (novalet_dev.libvirtd): `dev exec -- CMD...` runs a
command there, to reach guests. `dev image --name NAME` publishes the tiny guest as a
ClusterVirtualImage served by the stack's image server (novalet_dev.images); `dev image --pool
DIR` preloads it into an agent's pool instead. `dev up --hosts N` runs N hypervisor hosts, each
a private libvirtd of its own (novalet_dev.hosts); `--host NAME` picks one for `dev env` and
`dev exec`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from .controlplane import ControlPlane, ControlPlaneError, find_bin_dir, repo_root
from .hosts import MAX_HOSTS, Host, Hosts, host_index
from .images import ImagePublishError, ImageServer, ImageServerError
from .libvirtd import Libvirtd, LibvirtdError, domain_type
from .node import NODE_NAME, Node, NodeError, chart_values, images_in_podman


def default_state_dir() -> Path:
    if os.environ.get("NOVALET_STATE_DIR"):
        return Path(os.environ["NOVALET_STATE_DIR"]).absolute()
    root = repo_root()
    if root is not None:
        return root / ".novalet-dev"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "novalet-dev"


def _state(args: argparse.Namespace) -> Path:
    return Path(args.state_dir).absolute() if args.state_dir else default_state_dir()


def _stack(args: argparse.Namespace) -> tuple[Path, ControlPlane, Libvirtd]:
    state = _state(args)
    return state, ControlPlane(state / "kube"), Libvirtd(state / "libvirt")


def _err(msg: str) -> None:
    print(f"novalet dev: {msg}", file=sys.stderr)


def _host(args: argparse.Namespace) -> Host:
    """The host `--host NAME` names (host-1, the stack's libvirtd of old, by default)."""
    return Hosts(_state(args)).host(args.host or "host-1")


def _hosts_arg(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_HOSTS:
        raise argparse.ArgumentTypeError(f"a number of hosts from 1 to {MAX_HOSTS}, not {text!r}")
    return count


def _host_arg(text: str) -> str:
    try:
        host_index(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def _network_text(host: Host) -> str:
    net = host.network
    return f"network {net.name}: bridge {net.bridge}, {net.gateway}/24"


def _up(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    state, cp, _ = _stack(args)
    state.mkdir(parents=True, exist_ok=True)
    try:
        if args.no_kube:
            pass
        elif cp.is_running() and cp.ready():
            print(f"control plane already up: {cp.server}")
        else:
            if cp.is_running():  # partial or unhealthy leftovers: restart cleanly
                cp.stop()
            cp = ControlPlane(cp.state_dir, bin_dir=find_bin_dir())
            cp.start()
            print(f"control plane up: {cp.server}")
        if not args.no_crds and not args.no_kube:
            files = cp.apply_crds(Path(args.crds) if args.crds else None)
            print(f"CRDs applied: {', '.join(f.name for f in files) or '(none found)'}")
        if not args.no_libvirt:
            def started(host: Host, was_up: bool) -> None:
                if host.index == 1:  # as a one-host stack always said
                    print(f"libvirtd already up: {host.uri}" if was_up
                          else f"libvirtd up: {host.uri} (domain type {domain_type()})")
                else:
                    print(f"libvirtd {host.name} {'already ' if was_up else ''}up: {host.uri} ({_network_text(host)})")

            hosts = Hosts(state)
            wanted = args.hosts or 1
            hosts.up(wanted, started=started)
            others = [h.name for h in hosts.listed() if h.index > wanted and h.libvirtd.is_running()]
            if others:
                print(f"also running: {', '.join(others)} (`novalet dev down` stops every host)")
        if args.kubelet:
            if args.no_kube or args.no_libvirt:
                raise ValueError("--kubelet needs the control plane and host-1's libvirtd")
            node = Node(cp, NODE_NAME)
            was_up = node.is_running()
            node.start()
            print(f"node {node.name} {'already ' if was_up else ''}up: kubelet, containerd and kube-scheduler "
                  f"(node address {node.status()['ip']} in its network namespace {node.netns.path})")
            loaded = node.load_images(images_in_podman())
            print(f"images in the node's containerd: {', '.join(loaded)}" if loaded else
                  "no image to load yet: hack/build-image.sh builds localhost/novalet:dev and loads it here")
        if not args.no_kube:  # what `dev image --name` publishes from
            srv = ImageServer(state)
            was_up = srv.is_running() and srv.healthy()
            srv.start()
            print(f"image server {'already ' if was_up else ''}up: {srv.base}/ (serving {srv.root})")
    except (ControlPlaneError, LibvirtdError, ImageServerError, NodeError, ValueError) as e:
        _err(str(e))
        return 1
    print(f"ready in {time.monotonic() - t0:.1f}s; run: eval \"$(novalet dev env)\"")
    return 0


def _down(args: argparse.Namespace) -> int:
    state, cp, lv = _stack(args)
    srv = ImageServer(state)
    was = cp.is_running() or lv.is_running() or srv.is_running()
    node = Node(cp, NODE_NAME)
    was = node.is_running() or was
    node.stop()  # its pods first: the agent pod talks to host-1's libvirtd
    was = bool(Hosts(state).down(destroy_domains=not args.keep_guests)) or was  # host-1 is lv
    cp.stop()
    srv.stop()
    print("stopped" if was else "not running")
    return 0


def _status(args: argparse.Namespace) -> int:
    state, cp, _ = _stack(args)
    cps, srvs = cp.status(), ImageServer(state).status()
    hosts = [h.status() for h in Hosts(state).listed()]  # host-1 first: the stack's libvirtd
    lvs = hosts[0]
    node = Node(cp, NODE_NAME).status()
    # the image server is not counted: `dev image` starts it when it is not running
    ok = all(c["running"] and c.get("healthy") for c in cps["components"].values()) and \
        all(h["healthy"] for h in hosts)
    if args.json:
        print(json.dumps({"state_dir": str(state), "up": ok, "controlplane": cps, "libvirtd": lvs,
                          "hosts": hosts, "image_server": srvs, "node": node}, indent=2))
        return 0 if ok else 3
    print(f"state dir: {state}")
    rows = [(n, c) for n, c in cps["components"].items()] + [("libvirtd", lvs)] + \
        [(f"libvirtd {h['host']}", h) for h in hosts[1:]] + [("image-server", srvs)]
    for name, c in rows:
        if not c["running"]:
            print(f"  {name:<24} stopped")
            continue
        where = c.get("url") or (f"port {c['port']}" if c.get("port") else (c.get("uri") or ""))
        health = "healthy" if c.get("healthy") else "UNHEALTHY"
        print(f"  {name:<24} pid {c['pid']:<8} {health:<9} {where}  (log {c['log']})")
    if cps["server"]:
        print(f"  server: {cps['server']}  kubeconfig: {cps['kubeconfig']}")
    print(f"  libvirt uri: {lvs['uri']}  domain type: {domain_type()}")
    if lvs["netns"]:
        net = lvs["network"]
        print(f"  guest network: {net['name']} (bridge {net['bridge']}, {net['address']}) in the network "
              f"namespace {lvs['netns']}: `novalet dev exec -- CMD` runs CMD there")
    print(f"  hosts ({len(hosts)}; `novalet dev env --host NAME`, `novalet dev exec --host NAME -- CMD`):")
    for h in hosts:
        net = h["network"]
        state_word = ("up" if h["healthy"] else "UNHEALTHY") if h["running"] else "stopped"
        print(f"    {h['host']:<8} {state_word:<9} host uuid {h['host_uuid'] or '-'}  network {net['name']} "
              f"(bridge {net['bridge']}, {net['address']})  {h['uri']}")
    if node["running"]:
        print(f"  node {node['name']}: kubelet + containerd up, address {node['ip']}, pods {node['podCIDR']} "
              f"(its own network namespace; `novalet dev chart-values` for helm install)")
    else:
        print("  node: none (`novalet dev up --kubelet` joins one)")
    return 0 if ok else 3


def _load_images(args: argparse.Namespace) -> int:
    """Copy images from podman into the running node's containerd; nothing to do without a node."""
    _, cp, _ = _stack(args)
    node = Node(cp, NODE_NAME)
    if not node.is_running():
        return 0
    try:
        for name in node.load_images(args.images):
            print(f"loaded {name} into node {node.name}")
    except NodeError as e:
        _err(str(e))
        return 1
    return 0


def _chart_values(args: argparse.Namespace) -> int:
    state = _state(args)
    print(json.dumps(chart_values(state, Hosts(state).host(1)), indent=2))
    return 0


def _env(args: argparse.Namespace) -> int:
    _, cp, _ = _stack(args)
    host = _host(args)
    lv = host.libvirtd
    if args.host is not None and not host.exists():
        _err(f"{host.name} was never started here: run `novalet dev up --hosts {host.index}`")
        return 1
    if not cp.kubeconfig.exists() and not host.exists():
        _err("the stack was never started here: run `novalet dev up`")
        return 1
    if cp.kubeconfig.exists():  # a `--no-kube` stack (a cluster of your own) has none
        print(f"export KUBECONFIG={shlex.quote(str(cp.kubeconfig))}")
    print(f"export LIBVIRT_DEFAULT_URI={shlex.quote(lv.uri)}")
    # kubectl, helm, and this environment's scripts: `kubectl novalet` is kubectl-novalet found there
    dirs = [str(d) for d in (cp.known_bin_dir, Path(sys.executable).parent) if d]
    print(f"export PATH={shlex.quote(os.pathsep.join(dirs))}:\"$PATH\"")
    if args.host is not None:
        if not lv.is_running():
            _err(f"warning: {host.name} is not running: run `novalet dev up --hosts {host.index}`")
    elif not (cp.is_running() and lv.is_running()):
        _err("warning: the stack is not (fully) running: run `novalet dev up`")
    return 0


def _exec(args: argparse.Namespace) -> int:
    """Replace this process with CMD inside the stack's network namespace (nsenter), so its
    exit status, signals and terminal are CMD's own. An argv list: no shell in between."""
    host = _host(args)
    lv = host.libvirtd
    argv = list(args.cmd)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        _err("usage: novalet dev exec [--state-dir DIR] [--host NAME] -- CMD [ARG...]")
        return 2
    if os.geteuid() != 0:
        _err("joining the stack's network namespace needs root: run it as root or via sudo")
        return 1
    if not lv.netns_exists():
        up = "novalet dev up" + (f" --hosts {host.index}" if host.index > 1 else "")
        _err(f"{'the stack' if host.index == 1 else host.name}'s network namespace ({lv.netns_path}) is not "
             f"there: run `{up}`")
        return 1
    command = lv.netns_command(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 127  # not reached


def _image(args: argparse.Namespace) -> int:
    from .guest import GuestBuildError, build_tiny_image
    from .images import check_name, publish_tiny, stack_control_plane

    if args.pool is not None:  # preloaded by hand: the agent finds it in its --image-pool
        args.pool.mkdir(parents=True, exist_ok=True)
        try:
            build_tiny_image(args.pool, args.name)
        except (GuestBuildError, ValueError) as e:
            _err(str(e))
            return 1
        print(f"image {args.name} ready in {args.pool}")
        return 0
    state = _state(args)
    try:
        check_name(args.name)
        published = publish_tiny(stack_control_plane(state), ImageServer(state), args.name)
    except (ImagePublishError, ControlPlaneError) as e:
        _err(str(e))
        return 1
    http = published.spec["source"]["http"]
    print(f"ClusterVirtualImage {published.name} {published.action}: {http['url']} (sha256 {http['sha256']}), "
          f"with its .kernel and .initrd; instances with image: {published.name} use it")
    return 0


def add_dev_commands(subparsers) -> argparse.ArgumentParser:
    """Register `dev {up,down,status,env,exec,image}` on an argparse subparsers object."""
    dev = subparsers.add_parser("dev", help="the local development stack (Kubernetes control plane + libvirtd)")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", default=None,
                       help="state directory (default: $NOVALET_STATE_DIR or <repo>/.novalet-dev)")

    up = dev_sub.add_parser("up", help="start etcd, kube-apiserver, kube-controller-manager and libvirtd "
                                       "(detached) and install the CRDs")
    common(up)
    up.add_argument("--no-libvirt", action="store_true", help="do not start libvirtd")
    up.add_argument("--no-kube", action="store_true",
                    help="do not start the control plane (libvirtd only: for a cluster of your own)")
    up.add_argument("--no-crds", action="store_true", help="do not install the CRDs")
    up.add_argument("--crds", default=None, help="directory of CRD YAML files (default: <repo>/crds)")
    up.add_argument("--hosts", type=_hosts_arg, default=None, metavar="N",
                    help="run N hypervisor hosts, host-1 ... host-N, each a private libvirtd with its own host "
                         "UUID, state, network namespace and guest network (default 1: the stack's libvirtd); "
                         "on a running stack, adds the missing ones")
    up.add_argument("--kubelet", action="store_true",
                    help="also join a real node: kubelet, containerd (runc) and kube-scheduler, in a network "
                         "namespace of its own, so the Helm chart's pods run (docs/install.md)")
    up.set_defaults(func=_up)

    down = dev_sub.add_parser("down", help="stop the stack started by `dev up`")
    common(down)
    down.add_argument("--keep-guests", action="store_true",
                      help="leave QEMU guests running (default: destroy and undefine them)")
    down.set_defaults(func=_down)

    status = dev_sub.add_parser("status", help="what runs: pids, ports, health (exit 3 when not all up)")
    common(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    def host_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", type=_host_arg, default=None, metavar="NAME",
                       help="the host, host-1 ... host-N of `dev up --hosts N` (default host-1)")

    env = dev_sub.add_parser("env", help="print shell exports: eval \"$(novalet dev env)\"")
    common(env)
    host_option(env)
    env.set_defaults(func=_env)

    run_in = dev_sub.add_parser("exec", help="run a command inside the stack's network namespace, where the "
                                             "guests' network is: novalet dev exec -- CMD [ARG...]")
    common(run_in)
    host_option(run_in)
    run_in.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                        help="the command and its arguments (exit status passed through)")
    run_in.set_defaults(func=_exec)

    load = dev_sub.add_parser("load-images", help="copy images from podman into the node's containerd "
                                                  "(hack/build-image.sh calls it; nothing without a node)")
    common(load)
    load.add_argument("images", nargs="+", metavar="IMAGE")
    load.set_defaults(func=_load_images)

    values = dev_sub.add_parser("chart-values", help="print Helm values (JSON) that point the chart at the local "
                                                     "stack: the image, host-1's libvirtd socket, directories")
    common(values)
    values.set_defaults(func=_chart_values)

    image = dev_sub.add_parser(
        "image", help="the tiny test guest (Debian kernel + busybox): published on the running stack as a "
                      "ClusterVirtualImage, or with --pool preloaded into an agent's image pool",
        description="Without --pool: build the tiny guest, serve its disk, kernel and initrd from the stack's "
                    "loopback image server (<state>/images-http/, started if it is not running) and create the "
                    "ClusterVirtualImage NAME naming their URLs and sha256s on the stack's apiserver; each agent "
                    "fetches it on first use. Publishing the same bytes again changes nothing; a NAME taken by "
                    "another spec is an error (an image's spec is immutable: delete it first). With --pool DIR: "
                    "write NAME.qcow2/.kernel/.initrd/.cmdline into that directory (an image preloaded by hand, "
                    "found by the agent whose --image-pool it is; no apiserver involved).")
    common(image)
    image.add_argument("--pool", type=Path, default=None,
                       help="preload into this agent --image-pool directory instead of publishing")
    image.add_argument("--name", default="tiny", help="image name (default: tiny)")
    image.set_defaults(func=_image)
    return dev
