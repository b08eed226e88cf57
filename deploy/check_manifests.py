"""Schema check of deploy/rayservice.yaml and deploy/podmonitor.yaml without a cluster (kubeconform-style).

Kubernetes' own kinds (the PersistentVolumeClaims, and each RayService pod template as a ``v1/PodTemplate``)
are validated strictly (unknown fields are errors) against the Kubernetes JSON schemas that the
``kubernetes-validate`` package ships. KubeRay's and the Prometheus Operator's own fields are checked
against the schemas below, transcribed from their API types (KubeRay ``ray-operator/apis/ray/v1``
``raycluster_types.go`` and ``rayservice_types.go``, the source its CRD is generated from; the Prometheus
Operator's ``PodMonitor`` / ``PodMetricsEndpoint``): the full KubeRay CRD (830 kB) is not vendored here.

Run: ``pip install kubernetes-validate`` (a scratch venv; not a project dependency), then
``python deploy/check_manifests.py``; exits 1 naming every error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
K8S = "1.33.0"  # a Kubernetes release KubeRay 1.4 supports


def _obj(props: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_ANY_OBJ = {"type": "object"}  # checked by the Kubernetes schemas instead
_META = {"type": "object", "properties": {"name": {"type": "string"}, "labels": _STR_MAP}, "required": ["name"]}

HEAD_GROUP = _obj({"template": _ANY_OBJ, "headService": _ANY_OBJ, "enableIngress": {"type": "boolean"},
                   "rayStartParams": _STR_MAP, "serviceType": {"type": "string"}}, ("template", "rayStartParams"))
WORKER_GROUP = _obj({"suspend": {"type": "boolean"}, "groupName": {"type": "string"}, "replicas": _INT32,
                     "minReplicas": _INT32, "maxReplicas": _INT32, "idleTimeoutSeconds": _INT32,
                     "rayStartParams": _STR_MAP, "template": _ANY_OBJ, "scaleStrategy": _ANY_OBJ,
                     "numOfHosts": _INT32}, ("groupName", "rayStartParams", "template"))
RAY_CLUSTER = _obj({"suspend": {"type": "boolean"}, "managedBy": {"type": "string"}, "autoscalerOptions": _ANY_OBJ,
                    "headServiceAnnotations": _STR_MAP, "enableInTreeAutoscaling": {"type": "boolean"},
                    "gcsFaultToleranceOptions": _ANY_OBJ, "headGroupSpec": HEAD_GROUP,
                    "rayVersion": {"type": "string"}, "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP}},
                   ("headGroupSpec",))
RAY_SERVICE = _obj({
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"}, "metadata": _META,
    "spec": _obj({"serviceUnhealthySecondThreshold": _INT32, "deploymentUnhealthySecondThreshold": _INT32,
                  "serveService": _ANY_OBJ, "upgradeStrategy": _ANY_OBJ, "serveConfigV2": {"type": "string"},
                  "rayClusterConfig": RAY_CLUSTER, "excludeHeadPodFromServeSvc": {"type": "boolean"}},
                 ("rayClusterConfig",)),
})
_RELABEL = _obj({"sourceLabels": {"type": "array"}, "separator": {"type": "string"},
                 "targetLabel": {"type": "string"}, "regex": {"type": "string"}, "modulus": {"type": "integer"},
                 "replacement": {"type": "string"}, "action": {"type": "string"}})
POD_MONITOR = _obj({
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"}, "metadata": _META,
    "spec": _obj({
        "jobLabel": {"type": "string"}, "podTargetLabels": {"type": "array"}, "namespaceSelector": _ANY_OBJ,
        "selector": _obj({"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}}),
        "sampleLimit": {"type": "integer"},
        "podMetricsEndpoints": {"type": "array", "items": _obj({
            "port": {"type": "string"}, "portNumber": {"type": "integer"}, "path": {"type": "string"},
            "scheme": {"type": "string"}, "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)(ms|s|m|h))+)$"},
            "scrapeTimeout": {"type": "string"}, "honorLabels": {"type": "boolean"},
            "relabelings": {"type": "array", "items": _RELABEL},
            "metricRelabelings": {"type": "array", "items": _RELABEL}})},
    }, ("selector",)),
})


def _k8s(doc: dict, where: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S, strict=True)
        return []
    except kubernetes_validate.ValidationError as e:
        cause = e.__context__  # the jsonschema error, with the path of the offending field
        path = ".".join(map(str, cause.path)) if isinstance(cause, jsonschema.ValidationError) else ""
        return [f"{where}: {path}: {str(e).splitlines()[0]}"]


def _own(doc: dict, schema: dict, where: str) -> list[str]:
    v = jsonschema.Draft202012Validator(schema)
    return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}" for e in v.iter_errors(doc)]


def check() -> tuple[int, list[str]]:
    """Returns ``(documents checked, errors)``."""
    errors, n = [], 0
    for name in ("rayservice.yaml", "podmonitor.yaml"):
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            where, n = f"{name} {doc['kind']}/{doc['metadata']['name']}", n + 1
            if doc["kind"] == "RayService":
                errors += _own(doc, RAY_SERVICE, where)
                cluster = doc["spec"]["rayClusterConfig"]
                for g in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
                    tmpl = {"apiVersion": "v1", "kind": "PodTemplate",
                            "metadata": {"name": g.get("groupName", "head")}, "template": g["template"]}
                    errors += _k8s(tmpl, f"{where} {tmpl['metadata']['name']} pod template")
                    n += 1
            elif doc["kind"] == "PodMonitor":
                errors += _own(doc, POD_MONITOR, where)
            else:
                errors += _k8s(doc, where)
    return n, errors


if __name__ == "__main__":
    checked, errs = check()
    print("\n".join(errs) or f"{checked} documents valid (Kubernetes {K8S} strict schemas, KubeRay and "
          "Prometheus Operator types)")
    sys.exit(1 if errs else 0)
