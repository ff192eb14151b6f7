"""One kubernetes_asyncio ApiClient per process, from KUBECONFIG or the in-cluster account."""
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
from kubernetes_asyncio import client, config

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


async def api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """kubectl's rules: --kubeconfig, else $KUBECONFIG, else the in-cluster account, else
    ~/.kube/config; --context picks a context other than the current one."""
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig and not context:
        config.load_incluster_config()
        return _without_env_lookups(client.ApiClient())
    configuration = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    return _without_env_lookups(client.ApiClient(configuration))


def default_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace kubectl would use: the context's, the pod's own in a cluster, else default."""
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig and not context:
        try:
            return Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip() or "default"
        except OSError:
            return "default"
    contexts, current = config.list_kube_config_contexts(kubeconfig)
    chosen = next((c for c in contexts if c["name"] == context), None) if context else current
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


def _without_env_lookups(api: client.ApiClient) -> client.ApiClient:
    """kubernetes_asyncio opens its aiohttp session with `trust_env=True`, so every request
    looks for ~/.netrc and reads the proxy variables again (a profile of the agent in a storm
    showed it among its largest costs). With no proxy variable set there is nothing to find (the apiserver's credentials
    come from the kubeconfig, a kubeconfig's proxy-url is passed per request): stop looking."""
    if not any(os.environ.get(name) for name in PROXY_VARIABLES):
        api.rest_client.pool_manager._trust_env = False  # aiohttp has no public setter
    return api


def register_login(registry: kopf.OperatorRegistry) -> None:
    """kopf logs in through kubernetes_asyncio too (a private registry has no default handler)."""

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return await kopf.login_via_async_client(**kwargs)


class RetryForever:
    """kopf's API-error backoffs (`settings.networking.error_backoffs`): 1, 2, 5, then every
    10 s for ever. kopf lets a watch fail the whole operator once the backoffs run out, and an
    apiserver restart on a loaded machine took longer than the 8 s we used to give it; a node's
    agent must outlive any apiserver outage (its fence keeps it from acting meanwhile)."""

    def __iter__(self) -> Iterator[float]:
        return itertools.chain((1, 2, 5), itertools.repeat(10))


def health_endpoint(args: Any) -> str | None:
    """kopf's liveness endpoint for `--health-port` at `--metrics-address` (None: off)."""
    if not args.health_port:
        return None
    host = args.metrics_address
    return f"http://[{host}]:{args.health_port}/healthz" if ":" in host else f"http://{host}:{args.health_port}/healthz"
