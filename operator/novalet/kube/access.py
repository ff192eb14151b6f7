"""The apiserver's word on who may do what, and the one Secret read SetPassword makes.

- `allowed`: a SubjectAccessReview (authorization.k8s.io/v1) for the requester's identity as
  the admission policy recorded it (username and groups): the same authorizer the policy asked.
- `policies_in_force`: whether the ValidatingAdmissionPolicy that verifies `requestedBy` and its
  Deny binding exist; without them `requestedBy` is a claim anyone could have written.
- `read_secret_key`: reads one key of one Secret without its body ever reaching a log:
  kubernetes_asyncio logs every preloaded response body at DEBUG (`--verbose`), so the Secret is
  read unpreloaded and parsed here, and no error message carries its data.
"""
import base64
import binascii
import json
import logging
import time
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from ..api.policies import REQUESTS_POLICY
from ..core.authorization import Check

log = logging.getLogger(__name__)


class SecretError(Exception):
    """The Secret cannot be used; the message (never its data) is what the user reads."""


class Access:
    def __init__(self, api: client.ApiClient, policy: str = REQUESTS_POLICY, ttl_s: float = 10.0):
        self.api = api
        self.policy, self.ttl_s = policy, ttl_s
        self._in_force: tuple[float, bool] | None = None

    async def allowed(self, user: str, groups: list[str] | None, check: Check) -> bool | None:
        """The authorizer's answer for `user` (with `groups`), None if the review failed."""
        review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
            user=user, groups=list(groups or []), resource_attributes=client.V1ResourceAttributes(
                verb=check.verb, group=check.group, resource=check.resource,
                subresource=check.subresource or None, namespace=check.namespace or None,
                name=check.name or None)))
        try:
            answer = await client.AuthorizationV1Api(self.api).create_subject_access_review(review)
        except ApiException as error:
            log.warning("SubjectAccessReview for %s (%s) failed: %s %s", user, check.describe(), error.status,
                        error.reason)
            return None
        except Exception as error:  # noqa: BLE001 - apiserver unreachable: no answer, refuse
            log.warning("SubjectAccessReview for %s (%s) failed: %s", user, check.describe(), error)
            return None
        return bool(answer.status and answer.status.allowed)

    async def policies_in_force(self, fresh: bool = False) -> bool:
        """The policy and a binding of the same name that denies. `fresh`: ask the apiserver now
        (a decision depends on it), else an answer up to `ttl_s` old will do (a record)."""
        cached = self._in_force
        if not fresh and cached and time.monotonic() - cached[0] < self.ttl_s:
            return cached[1]
        admission = client.AdmissionregistrationV1Api(self.api)
        try:
            await admission.read_validating_admission_policy(self.policy)
            binding = await admission.read_validating_admission_policy_binding(self.policy)
            in_force = binding.spec.policy_name == self.policy and "Deny" in (binding.spec.validation_actions or [])
        except ApiException as error:
            if error.status not in (403, 404):
                log.warning("cannot read ValidatingAdmissionPolicy %s: %s %s", self.policy, error.status,
                            error.reason)
            in_force = False
        except Exception as error:  # noqa: BLE001
            log.warning("cannot read ValidatingAdmissionPolicy %s: %s", self.policy, error)
            in_force = False
        if not in_force:
            log.warning("ValidatingAdmissionPolicy %s and its Deny binding are not in force: requests that "
                        "need the requester's identity are refused", self.policy)
        self._in_force = (time.monotonic(), in_force)
        return in_force

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        """The UTF-8 text in `key` of Secret namespace/name, read with the agent's own account."""
        response = await client.CoreV1Api(self.api).read_namespaced_secret(name, namespace, _preload_content=False)
        try:
            raw = await response.read()
            status = response.status
        finally:
            response.release()
        if status != 200:
            raise SecretError(_refused_read(namespace, name, status, raw))
        try:
            data: dict[str, Any] = json.loads(raw).get("data") or {}
        except ValueError:
            raise SecretError(f"cannot read Secret {name}: the apiserver's answer is not JSON") from None
        finally:
            del raw
        encoded = data.get(key)
        if encoded is None:
            keys = ", ".join(sorted(data)) or "none"
            raise SecretError(f"Secret {name} has no key {key} (keys: {keys})")
        try:
            value = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            # never chain the exception: UnicodeDecodeError carries the bytes
            raise SecretError(f"Secret {name} key {key} is not UTF-8 text: a password must be UTF-8 "
                              "(kubectl create secret generic NAME --from-literal=password=...)") from None
        if not value:
            raise SecretError(f"Secret {name} key {key} is empty")
        return value


def _refused_read(namespace: str, name: str, status: int, raw: bytes) -> str:
    try:
        reason = json.loads(raw).get("reason") or str(status)
    except ValueError:
        reason = str(status)
    if status == 404:
        return f"Secret {name} not found in namespace {namespace}"
    if status == 403:
        return (f"the agent may not read Secrets in namespace {namespace}: SetPassword is opt-in per namespace; "
                f"bind the ClusterRole <release>-novalet-setpassword to the agent's ServiceAccount there "
                f"(docs/install.md)")
    return f"cannot read Secret {name}: {reason}"
