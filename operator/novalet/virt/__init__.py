"""libvirt side of novalet: domain XML, the image pool and instance disks, the Hypervisor."""

from .domain_xml import (
    NS,
    Disk,
    DomainConfig,
    Flavor,
    InstanceMetadata,
    KernelBoot,
    build_domain_xml,
    domain_name,
    instance_domain_config,
    read_metadata,
)
from .images import Image, ImageError, ImageNotFound, ImagePool, InvalidImageName, validate_image_name

__all__ = [
    "NS",
    "POWER_STATES",
    "Disk",
    "DomainConfig",
    # hypervisor (imports libvirt): DomainFacts, DomainNotFound, Hypervisor, HypervisorError, InstanceSpec
    "DomainFacts",
    "DomainNotFound",
    "Flavor",
    "Hypervisor",
    "HypervisorError",
    "Image",
    "ImageError",
    "ImageNotFound",
    "ImagePool",
    "InstanceMetadata",
    "InstanceSpec",
    "InvalidImageName",
    "KernelBoot",
    "build_domain_xml",
    "domain_name",
    "instance_domain_config",
    "read_metadata",
    "validate_image_name",
]


def __getattr__(name: str):
    # lazy, so that pure users (XML building, image names) do not need libvirt-python
    if name in ("DomainFacts", "DomainNotFound", "Hypervisor", "HypervisorError", "InstanceSpec", "POWER_STATES",
                "ensure_event_loop"):
        from . import hypervisor

        return getattr(hypervisor, name)
    raise AttributeError(name)
