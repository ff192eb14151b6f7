"""novalet: libvirt virtual machines with OpenStack Nova's lifecycle semantics, on Kubernetes."""

GROUP = "novalet.io"
VERSION = "v1alpha1"
PLURAL = "virtualinstances"
KIND = "VirtualInstance"
FINALIZER = "novalet.io/domain"
