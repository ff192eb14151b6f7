"""The `novalet` command: `run` (the per-node agent), `probe-domain-type`, `console`, `crd` and `dev ...` (the
local stack)."""
import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path

# The generated manifests and where they are checked in (the chart keeps copies: Helm reads no
# file outside the chart).
GENERATED = {
    "crd": ("crds/novalet.io_virtualinstances.yaml", "charts/novalet/crds/novalet.io_virtualinstances.yaml"),
    "ClusterVirtualImage": ("crds/novalet.io_clustervirtualimages.yaml",
                            "charts/novalet/crds/novalet.io_clustervirtualimages.yaml"),
    "VirtualImage": ("crds/novalet.io_virtualimages.yaml", "charts/novalet/crds/novalet.io_virtualimages.yaml"),
    "Hypervisor": ("crds/novalet.io_hypervisors.yaml", "charts/novalet/crds/novalet.io_hypervisors.yaml"),
    "policies": ("crds/novalet.io_admission-policies.yaml",
                 "charts/novalet/files/novalet.io_admission-policies.yaml"),
}


def _crd(args: argparse.Namespace) -> int:
    from .api.crd import crd_yaml, hypervisor_crd_yaml, image_crd_yaml
    from .api.policies import policies_yaml

    if args.write is not None:
        root = Path(args.write)
        texts = {"crd": crd_yaml(), "policies": policies_yaml(),
                 **{kind: image_crd_yaml(kind) for kind in ("ClusterVirtualImage", "VirtualImage")},
                 "Hypervisor": hypervisor_crd_yaml()}
        for kind, text in texts.items():
            for path in GENERATED[kind]:
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_text(text)
                print(f"wrote {root / path}")
        return 0
    text = policies_yaml() if args.policies else image_crd_yaml(args.image) if args.image else crd_yaml()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


def _run(args: argparse.Namespace) -> int:
    from .agent.main import run_agent

    return run_agent(args)


def _controller(args: argparse.Namespace) -> int:
    from .controller.main import run_controller

    return run_controller(args)


def _probe_domain_type(args: argparse.Namespace) -> int:
    from .virt.probe import run

    return run(args)


def _console(args: argparse.Namespace) -> int:
    from .console import run

    return run(args)


def _escape(text: str) -> str:
    from .console import escape_argument  # imported when used: libvirt loads with it

    return escape_argument(text)


def _boolean(text: str) -> bool:
    """`--reap-orphans=false`: true/false (also yes/no, on/off, 1/0)."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _size(text: str) -> int:
    """`50Gi`, `500Mi`, `1Ti`, `1024Ki` or a number of bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = (text[:-2], units[text[-2:]]) if text[-2:] in units else (text, 1)
    try:
        value = int(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 50Gi, 500Mi or a number of bytes, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return value


def _network(text: str) -> tuple[str, tuple[str, str]]:
    from .agent.operations import parse_network

    try:
        return parse_network(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="novalet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent for one hypervisor node")
    run.add_argument("--node-name", required=True, help="the node this agent serves")
    run.add_argument("--libvirt-uri", default=None, help="libvirt URI (default: $LIBVIRT_DEFAULT_URI)")
    run.add_argument("--image-pool", type=Path, default=Path("/var/lib/novalet/images"),
                     help="the node's image cache: images preloaded by hand, and catalog/ (VirtualImage and "
                          "ClusterVirtualImage copies, snapshots)")
    run.add_argument("--vcpus", type=int, default=0, metavar="N",
                     help="vCPUs the scheduler may place here before the ratio (default: the host's)")
    run.add_argument("--memory-mib", type=int, default=0, metavar="M",
                     help="memory (MiB) the scheduler may place here before the ratio (default: the host's)")
    run.add_argument("--cpu-allocation-ratio", type=float, default=1.0, metavar="R",
                     help="vCPUs placed per vCPU of capacity (Nova's cpu_allocation_ratio; default 1.0)")
    run.add_argument("--memory-allocation-ratio", type=float, default=1.0, metavar="R",
                     help="memory placed per MiB of capacity (Nova's ram_allocation_ratio; default 1.0)")
    run.add_argument("--snapshot-quota-count", type=int, default=10, metavar="N",
                     help="snapshots (VirtualImages made by Snapshot) a namespace may keep (default: 10)")
    run.add_argument("--snapshot-quota-bytes", type=_size, default=50 * 2**30, metavar="BYTES",
                     help="their total size, e.g. 50Gi (default), 500Mi or a number of bytes")
    run.add_argument("--state-dir", type=Path, default=Path("/var/lib/novalet"),
                     help="where instance disks live")
    run.add_argument("--migration-uri", default=None, metavar="URI",
                     help="the libvirt URI a migration's source libvirtd reaches this node's libvirtd by "
                          "(peer to peer; default: --libvirt-uri)")
    run.add_argument("--migration-socket-dir", type=Path, default=Path("/run/novalet/migration"), metavar="DIR",
                     help="where this node's QEMU takes an incoming guest's memory and disks (unix sockets; the "
                          "source's QEMU must reach it; default /run/novalet/migration)")
    run.add_argument("--migration-peer-dead-after", type=float, default=60.0, metavar="S",
                     help="seconds the other node of a migration must have been dead (its agent's Lease "
                          "expired) before this agent takes over and ends the migration (default 60)")
    run.add_argument("--migration-timeout", type=float, default=300.0, metavar="S",
                     help="seconds a migration call may take before the agent looks at libvirt's job instead")
    run.add_argument("--namespace", action="append", default=None,
                     help="watch only this namespace (repeatable; default: all)")
    run.add_argument("--soft-reboot-timeout", type=float, default=60.0,
                     help="seconds a guest gets to reboot softly before a hard reboot")
    run.add_argument("--stop-timeout", type=float, default=60.0,
                     help="seconds a guest gets to shut down on ACPI before it is powered off")
    run.add_argument("--lease-namespace", default="kube-node-lease",
                     help="namespace of the agents' heartbeat Leases")
    run.add_argument("--lease-duration", type=float, default=20.0,
                     help="seconds without a renewal after which a standby agent takes the node's Lease")
    run.add_argument("--renew-deadline", type=float, default=10.0,
                     help="seconds after its last renewal began that the holder stops acting (< lease duration)")
    run.add_argument("--lease-retry-period", type=float, default=2.0,
                     help="seconds between Lease renewals (and a standby's looks)")
    run.add_argument("--backoff-base", type=float, default=10.0,
                     help="seconds before a failed declarative step is tried again (doubling each time)")
    run.add_argument("--backoff-cap", type=float, default=300.0,
                     help="the longest wait between tries of a failing step")
    run.add_argument("--resync-seconds", type=float, default=30.0,
                     help="seconds between full sweeps of the node's instances (drift, retries, orphans)")
    run.add_argument("--domain-type", choices=["auto", "qemu", "kvm"], default="auto",
                     help="libvirt domain type (auto: TCG unless a probe booted a guest under KVM)")
    run.add_argument("--reap-orphans", type=_boolean, default=True, metavar="true|false",
                     help="destroy domains (and disks) of this node whose VirtualInstance is confirmed "
                          "gone (default: true)")
    run.add_argument("--orphan-grace-seconds", type=float, default=300.0,
                     help="an orphan is reaped only after being confirmed gone at every look for this long")
    run.add_argument("--max-orphans-per-sweep", type=int, default=3,
                     help="more orphans than this at once (or all of the node's domains) is a mass: "
                          "nothing is reaped, a Warning Event on the node's Lease says why")
    run.add_argument("--libvirt-timeout", type=_positive, default=120.0,
                     help="seconds a libvirt operation may take before its task fails (a soft reboot or "
                          "resize's graceful power-off gets its own wait on top)")
    run.add_argument("--libvirt-query-timeout", type=_positive, default=30.0,
                     help="seconds a libvirt query (a domain's state, the domain list) may take")
    run.add_argument("--libvirt-threads", type=int, default=16,
                     help="threads for libvirt calls (waits on guests have a pool of their own)")
    run.add_argument("--workers", type=_positive_int, default=16,
                     help="instances reconciled at once (the work queue's workers; default 16: the "
                          "apiserver's conditional writes saturate near 16 writers, docs/benchmarks.md)")
    run.add_argument("--write-concurrency", type=_positive_int, default=4,
                     help="the agent's VirtualInstance writes at the apiserver at once, at most; the others "
                          "wait, namespaces in turn (default 4: as many writes per second as 16, each "
                          "answered sooner, docs/benchmarks.md)")
    run.add_argument("--metrics-port", type=int, default=0,
                     help="serve Prometheus metrics on this port (0: off; docs/operations.md)")
    run.add_argument("--metrics-address", default="127.0.0.1",
                     help="address the metrics listen on (0.0.0.0 in a pod, for Prometheus to scrape)")
    run.add_argument("--health-port", type=int, default=0,
                     help="serve kopf's liveness endpoint, GET /healthz, on this port at --metrics-address "
                          "(0: off; the chart's liveness and readiness probes)")
    run.add_argument("--network", action="append", type=_network, metavar="NAME=network:LIBVIRT_NETWORK",
                     help="a network this node provides to spec.interfaces: a libvirt network "
                          "(NAME=network:NET) or an existing host bridge (NAME=bridge:BRIDGE); repeatable "
                          "(default: default=network:default; docs/networks.md)")
    run.add_argument("--verbose", action="store_true")
    run.set_defaults(func=_run)

    ctl = sub.add_parser("controller", help="run the cluster controller: the scheduler, admission webhook, agent "
                                            "heartbeats")
    ctl.add_argument("--webhook-port", type=int, default=0, help="serve the validating webhook (0: off)")
    ctl.add_argument("--metrics-port", type=int, default=0,
                     help="serve Prometheus metrics on this port (0: off; docs/operations.md)")
    ctl.add_argument("--metrics-address", default="127.0.0.1",
                     help="address the metrics listen on (0.0.0.0 in a pod, for Prometheus to scrape)")
    ctl.add_argument("--health-port", type=int, default=0,
                     help="serve kopf's liveness endpoint, GET /healthz, on this port at --metrics-address "
                          "(0: off; the chart's liveness and readiness probes)")
    ctl.add_argument("--webhook-addr", default="127.0.0.1", help="address the webhook listens on")
    ctl.add_argument("--webhook-host", default="127.0.0.1",
                     help="host name or IP the apiserver uses to reach the webhook")
    ctl.add_argument("--webhook-service", metavar="NAMESPACE/NAME",
                     help="register the webhook by this Service (in a cluster) instead of by URL")
    ctl.add_argument("--remove-webhook-on-exit", action="store_true",
                     help="delete the webhook configuration on a clean exit (local runs)")
    ctl.add_argument("--register-webhook", action=argparse.BooleanOptionalAction, default=True,
                     help="write the ValidatingWebhookConfiguration at start (default; local runs). "
                          "--no-register-webhook: it is installed by the Helm chart, only serve it")
    ctl.add_argument("--tls-cert", type=Path, help="serving certificate (default: self-signed)")
    ctl.add_argument("--tls-key", type=Path)
    ctl.add_argument("--state-dir", type=Path, default=Path("/var/lib/novalet"))
    ctl.add_argument("--lease-namespace", default="kube-node-lease")
    ctl.add_argument("--placement", choices=("spread", "pack"), default="spread",
                     help="the scheduler's weigher: spread (most free memory first, the default) or pack")
    ctl.add_argument("--evacuate-after", type=float, default=60.0, metavar="S",
                     help="seconds a node's agent Lease must have been expired before Evacuate rebuilds its "
                          "instances elsewhere (default 60)")
    ctl.add_argument("--scheduler-lease", default="novalet-scheduler", metavar="NAME",
                     help="the Lease (in --lease-namespace) the one active scheduler holds")
    ctl.add_argument("--scheduler", action=argparse.BooleanOptionalAction, default=True,
                     help="place unpinned instances (one controller at a time holds the scheduler's Lease)")
    ctl.add_argument("--verbose", action="store_true")
    ctl.set_defaults(func=_controller)

    probe = sub.add_parser("probe-domain-type",
                           help="boot a probe guest under KVM through libvirt: print the domain type that boots "
                                "guests here (kvm or qemu) and record it for `run --domain-type auto`")
    probe.add_argument("--connect", "--libvirt-uri", dest="connect", default=None, metavar="URI",
                       help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system)")
    probe.add_argument("--pool", "--image-pool", dest="pool", type=Path, default=Path("/var/lib/novalet/images"),
                       metavar="DIR", help="a directory libvirtd's QEMU reads at the same path, for the probe's "
                                           "firmware file (default: the agent's image pool, /var/lib/novalet/images)")
    probe.add_argument("--record", type=Path, default=None, metavar="FILE",
                       help="where to record the answer (default: kvm-probe.json in $NOVALET_CACHE, else "
                            "~/.cache/novalet: where `run --domain-type auto` reads it)")
    probe.add_argument("--timeout", type=_positive, default=5.0, metavar="S",
                       help="seconds the probe guest gets to print its last marker (default 5)")
    probe.add_argument("--domain-type", choices=("kvm", "qemu"), default="kvm",
                       help="qemu: check the probe itself, booting its guest under TCG (exit 0 if it boots); "
                            "nothing is recorded")
    probe.set_defaults(func=_probe_domain_type)

    con = sub.add_parser("console", help="the guest's serial console (libvirt's console stream, as virsh "
                                         "console); run it where the instance's libvirt is reachable")
    con.add_argument("target", metavar="[NAMESPACE/]NAME",
                     help="the VirtualInstance (without NAMESPACE/: the kubeconfig context's namespace)")
    con.add_argument("--libvirt-uri", default=None,
                     help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system)")
    con.add_argument("--kubeconfig", default=None, help="path to the kubeconfig file (kubectl's rules)")
    con.add_argument("--context", default=None, help="the kubeconfig context to use")
    con.add_argument("--escape", type=_escape, default="^]", metavar="^X",
                     help="the key that ends the session (default: ^], Ctrl-])")
    con.add_argument("--force", action="store_true",
                     help="take the console from another session (which ends)")
    con.set_defaults(func=_console)

    crd = sub.add_parser("crd", help="print the CustomResourceDefinition generated from the models")
    crd.add_argument("-o", "--output", default="-")
    crd.add_argument("--policies", action="store_true",
                     help="print the admission policies (novalet-requester, novalet-requests) instead")
    crd.add_argument("--image", choices=("ClusterVirtualImage", "VirtualImage"), default=None,
                     help="print the CRD of an image kind instead")
    crd.add_argument("--write", nargs="?", const=".", default=None, metavar="REPO",
                     help="write the CRDs and the admission policies to crds/ and the chart's copies "
                          "(charts/novalet/crds, charts/novalet/files) under REPO (default: .)")
    crd.set_defaults(func=_crd)

    from . import docs_render

    docs = sub.add_parser("docs", help="write docs/lifecycle-tables.md from the core tables")
    docs_render.add_arguments(docs)
    docs.set_defaults(func=docs_render.run)

    for extension in entry_points(group="novalet.commands"):
        extension.load()(sub)  # e.g. `novalet dev` (novalet_dev): the product never imports it by name
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
