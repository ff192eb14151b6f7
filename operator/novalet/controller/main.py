"""`novalet controller`: the validating webhook and the heartbeat watch (one per cluster)."""
import argparse
import asyncio
import base64
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import kopf
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from .. import GROUP, PLURAL, VERSION
from ..api.models import VirtualInstance
from ..core.admission import review
from ..kube.client import RetryForever, api_client, health_endpoint, register_login
from ..tls import self_signed
from .heartbeat import HeartbeatWatch
from .metrics import ControllerMetrics
from .scheduler import Scheduler

log = logging.getLogger("novalet.controller")
WEBHOOK_NAME = "validate.virtualinstances.novalet.io"
HANDLER_ID = "validate"


def _parse(body: Any) -> VirtualInstance | None:
    return VirtualInstance.model_validate(dict(body)) if body else None


def client_config(url: str, service: str | None, port: int, ca_bundle: bytes) -> dict[str, Any]:
    """By Service reference when given (in a cluster: the apiserver often cannot resolve
    `*.svc` names, but always reaches a Service), else by URL (the local stack, loopback)."""
    bundle = base64.b64encode(ca_bundle).decode()
    if service:
        namespace, name = service.split("/", 1)
        return {"service": {"namespace": namespace, "name": name, "port": port, "path": f"/{HANDLER_ID}"},
                "caBundle": bundle}
    return {"url": url, "caBundle": bundle}


def webhook_configuration(client_config: dict[str, Any]) -> dict[str, Any]:
    """Called only when the spec changes (matchConditions): the agent's metadata and status
    writes never depend on the webhook being up, so a down webhook cannot wedge a delete."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_NAME},
        "webhooks": [{
            "name": WEBHOOK_NAME, "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 5,
            "clientConfig": client_config,
            "rules": [{"apiGroups": [GROUP], "apiVersions": [VERSION], "resources": [PLURAL],
                       "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}],
            "matchConditions": [{"name": "spec-changed",
                                 "expression": "request.operation == 'CREATE' || object.spec != oldObject.spec"}],
        }],
    }


async def ensure_webhook_configuration(api: client.ApiClient, config: dict[str, Any]) -> None:
    admission = client.AdmissionregistrationV1Api(api)
    body = webhook_configuration(config)
    try:
        existing = await admission.read_validating_webhook_configuration(WEBHOOK_NAME)
        body["metadata"]["resourceVersion"] = existing.metadata.resource_version
        await admission.replace_validating_webhook_configuration(WEBHOOK_NAME, body)
    except ApiException as error:
        if error.status != 404:
            raise
        await admission.create_validating_webhook_configuration(body)


def build_registry(args: argparse.Namespace) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    register_login(registry)
    background: list[asyncio.Task] = []
    metrics = ControllerMetrics()
    watches: list[HeartbeatWatch] = []  # the one started at startup; the webhook reads its networks

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False
        settings.networking.error_backoffs = RetryForever()
        api = await api_client()
        if args.webhook_port:
            host = args.webhook_host
            cert, key = ((args.tls_cert, args.tls_key) if args.tls_cert
                         else self_signed([host], args.state_dir / "webhook-tls"))
            settings.admission.server = kopf.WebhookServer(
                addr=args.webhook_addr, port=args.webhook_port, host=host, certfile=str(cert), pkeyfile=str(key))
            settings.admission.managed = None  # we write the configuration: it needs matchConditions
            if args.register_webhook:  # else the chart installed it (with its caBundle) before we ran
                url = f"https://{host}:{args.webhook_port}/{HANDLER_ID}"
                await ensure_webhook_configuration(api, client_config(
                    url, args.webhook_service, args.webhook_port, Path(cert).read_bytes()))
        if args.metrics_port:
            metrics.serve(args.metrics_port, args.metrics_address)
            log.info("metrics on http://%s:%d/metrics", args.metrics_address, args.metrics_port)
        scheduler = None
        if args.scheduler:
            identity = f"scheduler/{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
            scheduler = Scheduler(await api_client(), args.lease_namespace, identity, policy=args.placement,
                                  lease_name=args.scheduler_lease, evacuate_after_s=args.evacuate_after)
            background.append(asyncio.get_running_loop().create_task(scheduler.run()))
        # every replica serves the webhook (which reads the Leases' networks); the one holding the
        # scheduler's Lease also marks the instances of dead agents, so N replicas write once
        watch = HeartbeatWatch(api, args.lease_namespace, metrics=metrics,
                               acting=scheduler.holds if scheduler is not None else None)
        watches.append(watch)
        background.append(asyncio.get_running_loop().create_task(watch.run()))

    @kopf.on.cleanup(registry=registry)
    async def remove_webhook(**_: Any) -> None:
        for task in background:  # kopf would wait 5 s for tasks it did not start
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if args.webhook_port and args.register_webhook and args.remove_webhook_on_exit:  # a local run
            api = await api_client()
            try:
                await client.AdmissionregistrationV1Api(api).delete_validating_webhook_configuration(WEBHOOK_NAME)
            except ApiException as error:
                log.info("webhook configuration not removed: %s", error.reason)
            finally:
                await api.close()

    def validate(body: kopf.Body, old: Any, **_: Any) -> None:
        why = review(_parse(body), _parse(old), watches[0].networks() if watches else {})
        metrics.admission_reviews.labels("denied" if why else "allowed").inc()
        if why:
            raise kopf.AdmissionError(why, code=422)

    if args.webhook_port:  # kopf refuses admission handlers without a server to serve them
        kopf.on.validate(GROUP, VERSION, PLURAL, id=HANDLER_ID, registry=registry,
                         operations=["CREATE", "UPDATE"])(validate)

    return registry


def run_controller(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = build_registry(args)
    asyncio.run(kopf.operator(registry=registry, standalone=True, clusterwide=True,
                              liveness_endpoint=health_endpoint(args)))
    return 0
