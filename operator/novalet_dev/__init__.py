"""The local development and test stack: a real Kubernetes control plane and a private libvirtd.

- :mod:`novalet_dev.controlplane`: etcd + kube-apiserver + kube-controller-manager on loopback.
- :mod:`novalet_dev.libvirtd`: a private libvirtd (QEMU driver) and :func:`domain_type`.
- :mod:`novalet_dev.cli`: ``novalet dev up|down|status|env``.
- :mod:`novalet_dev.testing`: pytest fixtures over the same code.
"""

from .controlplane import ControlPlane, ControlPlaneError, find_bin_dir
from .libvirtd import Libvirtd, LibvirtdError, domain_type, record_kvm_probe

__all__ = ["ControlPlane", "ControlPlaneError", "Libvirtd", "LibvirtdError", "domain_type", "find_bin_dir",
           "record_kvm_probe"]
