"""Validate Kubernetes manifests offline, as strictly as the API server and
``kubectl apply --validate=strict`` would (tests/test_k8s.py).

- ``ray.io/v1`` kinds: the KubeRay CRD schemas in ``../shared/k8s-schemas``
  (OpenAPI v3.0, checked with jsonschema's Draft 4 validator), after the three
  steps that ``SOURCE.md`` there describes: nulls pruned, ``default``s filled
  in, and every object closed (``additionalProperties: false``), since the CRDs
  leave objects open and the API server prunes (kubectl strict: rejects)
  unknown fields. Their ``metadata`` (a bare ``object`` in a CRD) goes through
  the typed ``V1ObjectMeta``.
- Kinds with a schema in ``core/`` (Kubernetes 1.32, strict): against it, nulls pruned.
- Other built-in kinds (PersistentVolumeClaim, Ingress, Namespace, ...): the
  ``kubernetes`` client's typed models. The client drops unknown fields and
  coerces types silently, so the document is round-tripped and compared with
  what went in: a typo or a wrong type shows up as a difference.

Both schema kinds also get ``x-kubernetes-list-map-keys`` (no two entries of a
list with the same key, e.g. two containers or env vars of one name). Not
checked: CEL rules (``x-kubernetes-validations``) and int32/int64 ranges.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

#: The kinds with a JSON schema in core/ (SOURCE.md's table).
CORE = {
    ("v1", "Service"): "service-v1.json",
    ("apps/v1", "Deployment"): "deployment-apps-v1.json",
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "Secret"): "secret-v1.json",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscaler-autoscaling-v2.json",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudget-policy-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
}
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayService": "ray.io_rayservices.yaml"}
#: Built-in kinds checked through the typed models (API groups whose models the client has).
TYPED_GROUPS = ("v1", "apps/v1", "batch/v1", "networking.k8s.io/v1", "rbac.authorization.k8s.io/v1",
                "policy/v1", "autoscaling/v2", "storage.k8s.io/v1")
_DATA_KEYS = ("default", "enum", "example")  # schema keywords whose values are data, not schemas


def pruned(value: Any) -> Any:
    """Without null-valued keys (an empty YAML key): the API server drops them."""
    if isinstance(value, dict):
        return {k: pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [pruned(v) for v in value]
    return value


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """``value`` with the schema's ``default``s filled in where a field is absent, as
    the API server does for CRDs (workerGroupSpecs' required min/maxReplicas have them)."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            out[k] = with_defaults(sub, v) if sub else v
        for k, sub in props.items():
            if k not in out and "default" in sub:
                out[k] = with_defaults(sub, copy.deepcopy(sub["default"]))
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [with_defaults(schema["items"], v) for v in value]
    return value


def closed(schema: Any) -> Any:
    """The schema with every object that lists its ``properties`` closed to others
    (unless it says ``additionalProperties`` or preserves unknown fields): strict mode."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in _DATA_KEYS else closed(v)) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if isinstance(item, dict):
            key = tuple(item.get(k) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"entries [{seen[key]}] and [{i}] have the same key "
                                                 f"{dict(zip(keys, key, strict=True))}")
            seen.setdefault(key, i)


# The core files declare a "$schema" jsonschema does not know: name the validator class.
Validator = jsonschema.validators.extend(jsonschema.Draft4Validator,
                                         {"x-kubernetes-list-map-keys": _list_map_keys})


@cache
def crd_validator(schemas: Path, kind: str) -> Any:
    doc = yaml.load((schemas / CRDS[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
    return Validator(closed(v1["schema"]["openAPIV3Schema"]))


@cache
def core_validator(schemas: Path, file: str) -> Any:
    return Validator(json.loads((schemas / "core" / file).read_text()))


def _schema_errors(validator: Any, doc: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def typed_model(api_version: str, kind: str) -> str | None:
    """The kubernetes client's model class for a built-in kind (``V1Ingress``), if it has one."""
    import kubernetes.client

    if api_version not in TYPED_GROUPS:
        return None
    version = api_version.rsplit("/", 1)[-1]
    name = version[0].upper() + version[1:] + kind
    return name if hasattr(kubernetes.client, name) else None


def _differences(sent: Any, back: Any, path: str) -> Iterator[str]:
    if isinstance(sent, dict) and isinstance(back, dict):
        for k, v in sent.items():
            where = f"{path}.{k}" if path else k
            if k not in back:
                yield f"{where}: unknown field"
            else:
                yield from _differences(v, back[k], where)
    elif isinstance(sent, list) and isinstance(back, list) and len(sent) == len(back):
        for i, (a, b) in enumerate(zip(sent, back, strict=True)):
            yield from _differences(a, b, f"{path}[{i}]")
    elif sent != back or type(sent) is not type(back):
        yield f"{path}: {sent!r} is not of the field's type (read back as {back!r})"


def typed_errors(doc: dict[str, Any], model: str, path: str = "") -> list[str]:
    """What the typed model refuses, drops or converts in ``doc``."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    try:
        obj = api._ApiClient__deserialize(doc, model)  # the path a response body takes
    except (ValueError, TypeError) as e:  # a required field missing, a value that is not of its type
        return [f"{path or '<root>'}: {model}: {e}"]
    return list(_differences(doc, api.sanitize_for_serialization(obj), path))


def errors(doc: dict[str, Any], schemas: Path) -> list[str]:
    """Why the API server (strict) would refuse ``doc``; empty when it would accept it."""
    doc = pruned(doc)
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if api_version == "ray.io/v1" and kind in CRDS:
        validator = crd_validator(schemas, kind)
        return (_schema_errors(validator, with_defaults(validator.schema, doc))
                + typed_errors(doc.get("metadata", {}), "V1ObjectMeta", "metadata"))
    if (api_version, kind) in CORE:
        validator = core_validator(schemas, CORE[(api_version, kind)])
        return _schema_errors(validator, with_defaults(validator.schema, doc))
    model = typed_model(str(api_version), str(kind))
    if model is not None:
        return typed_errors(doc, model)
    return [f"{api_version} {kind}: no schema and no typed model to check it against"]
