"""`novalet dev up|down|status|env|exec|image`: the local stack (control plane + private libvirtd
+ a loopback image server).

The daemons are started detached (each in its own session, pids in the state dir), so they
outlive the command; `dev down` stops exactly those processes. The guests' network exists only
inside the stack's network namespace (novalet_dev.libvirtd): `dev exec -- CMD...` runs a
command there, to reach guests. `dev image --name NAME` publishes the tiny guest as a
ClusterVirtualImage served by the stack's image server (novalet_dev.images); `dev image --pool
DIR` preloads it into an agent's pool instead.
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
from .images import ImagePublishError, ImageServer, ImageServerError
from .libvirtd import Libvirtd, LibvirtdError, domain_type


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


def _up(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    state, cp, lv = _stack(args)
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
            if lv.is_running() and lv.healthy():
                print(f"libvirtd already up: {lv.uri}")
            else:
                lv.start()
                print(f"libvirtd up: {lv.uri} (domain type {domain_type()})")
        if not args.no_kube:  # what `dev image --name` publishes from
            srv = ImageServer(state)
            was_up = srv.is_running() and srv.healthy()
            srv.start()
            print(f"image server {'already ' if was_up else ''}up: {srv.base}/ (serving {srv.root})")
    except (ControlPlaneError, LibvirtdError, ImageServerError) as e:
        _err(str(e))
        return 1
    print(f"ready in {time.monotonic() - t0:.1f}s; run: eval \"$(novalet dev env)\"")
    return 0


def _down(args: argparse.Namespace) -> int:
    state, cp, lv = _stack(args)
    srv = ImageServer(state)
    was = cp.is_running() or lv.is_running() or srv.is_running()
    lv.stop(destroy_domains=not args.keep_guests)
    cp.stop()
    srv.stop()
    print("stopped" if was else "not running")
    return 0


def _status(args: argparse.Namespace) -> int:
    state, cp, lv = _stack(args)
    cps, lvs, srvs = cp.status(), lv.status(), ImageServer(state).status()
    # the image server is not counted: `dev image` starts it when it is not running
    ok = all(c["running"] and c.get("healthy") for c in cps["components"].values()) and lvs["healthy"]
    if args.json:
        print(json.dumps({"state_dir": str(state), "up": ok, "controlplane": cps, "libvirtd": lvs,
                          "image_server": srvs}, indent=2))
        return 0 if ok else 3
    print(f"state dir: {state}")
    rows = [(n, c) for n, c in cps["components"].items()] + [("libvirtd", lvs), ("image-server", srvs)]
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
    return 0 if ok else 3


def _env(args: argparse.Namespace) -> int:
    _, cp, lv = _stack(args)
    if not cp.kubeconfig.exists():
        _err("the stack was never started here: run `novalet dev up`")
        return 1
    print(f"export KUBECONFIG={shlex.quote(str(cp.kubeconfig))}")
    print(f"export LIBVIRT_DEFAULT_URI={shlex.quote(lv.uri)}")
    # kubectl, helm, and this environment's scripts: `kubectl novalet` is kubectl-novalet found there
    dirs = [str(d) for d in (cp.known_bin_dir, Path(sys.executable).parent) if d]
    print(f"export PATH={shlex.quote(os.pathsep.join(dirs))}:\"$PATH\"")
    if not (cp.is_running() and lv.is_running()):
        _err("warning: the stack is not (fully) running: run `novalet dev up`")
    return 0


def _exec(args: argparse.Namespace) -> int:
    """Replace this process with CMD inside the stack's network namespace (nsenter), so its
    exit status, signals and terminal are CMD's own. An argv list: no shell in between."""
    _, _, lv = _stack(args)
    argv = list(args.cmd)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        _err("usage: novalet dev exec [--state-dir DIR] -- CMD [ARG...]")
        return 2
    if os.geteuid() != 0:
        _err("joining the stack's network namespace needs root: run it as root or via sudo")
        return 1
    if not lv.netns_exists():
        _err(f"the stack's network namespace ({lv.netns_path}) is not there: run `novalet dev up`")
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

    env = dev_sub.add_parser("env", help="print shell exports: eval \"$(novalet dev env)\"")
    common(env)
    env.set_defaults(func=_env)

    run_in = dev_sub.add_parser("exec", help="run a command inside the stack's network namespace, where the "
                                             "guests' network is: novalet dev exec -- CMD [ARG...]")
    common(run_in)
    run_in.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                        help="the command and its arguments (exit status passed through)")
    run_in.set_defaults(func=_exec)

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
