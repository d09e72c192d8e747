"""The Kubernetes recipes in examples/kubernetes/: every core object validates offline against the Kubernetes schemas,
the TrainJob has what Kubeflow's torch-distributed runtime needs, no manifest carries a secret, the Job, its Service
and the volume agree with each other, and the Job's own command, expanded as Kubernetes expands it, trains as two
local "pods" and resumes after a restart."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml
from torch.distributed.run import get_args_parser

from tests.conftest import CLASSIC_POEMS, TINY_SHAPE

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "kubernetes"
# the oldest schema kubernetes-validate carries and the newest: the recipes are meant for any cluster
SCHEMA_VERSIONS = (kubernetes_validate.utils.all_versions()[0], kubernetes_validate.latest_version())
TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
# torchrun's flags that the runtime's PET_* variables stand for, and those that would replace its rendezvous
PET_FLAGS = {"nnodes": "PET_NNODES", "nproc_per_node": "PET_NPROC_PER_NODE", "node_rank": "PET_NODE_RANK",
             "master_addr": "PET_MASTER_ADDR", "master_port": "PET_MASTER_PORT"}


# ---- reading the recipes -------------------------------------------------------------------------------------------
def documents() -> list[tuple[str, dict]]:
    """(file name, object) for every document of every recipe (multi-document files included)."""
    docs = []
    for path in sorted(RECIPES.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def the(kind: str) -> dict:
    [doc] = [doc for _, doc in documents() if doc["kind"] == kind]
    return doc


def env_list(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def job_container(job: dict) -> dict:
    [container] = job["spec"]["template"]["spec"]["containers"]
    return container


def torchrun_argv(command: list[str]) -> list[str] | None:
    """What follows torchrun in a container's command + args (torchrun, or python -m torch.distributed.run)."""
    for i, word in enumerate(command):
        if PurePosixPath(word).name == "torchrun":
            return command[i + 1:]
        if word == "-m" and command[i + 1:i + 2] == ["torch.distributed.run"]:
            return command[i + 2:]
    return None


def parse_torchrun(argv: list[str], pet: dict[str, str] | None = None):
    """torchrun's own parser on argv, with the PET_* variables `pet` set (torchrun reads them as its defaults)."""
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("PET_")}
    try:
        os.environ.update(pet or {})
        return get_args_parser().parse_args(argv)  # the defaults are read from the environment here
    finally:
        for name in pet or {}:
            os.environ.pop(name, None)
        os.environ.update(saved)


def flag_value(args: list[str], flag: str) -> str | None:
    """The last value of `--flag=value` / `--flag value` in args (argparse: the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(f"--{flag}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{flag}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def mounted_claim(pod_spec: dict, container: dict, path: str) -> tuple[str, dict] | None:
    """(mount path, volume) of the container's mount that holds `path`."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if PurePosixPath(path).is_relative_to(mount["mountPath"]):
            return mount["mountPath"], volumes[mount["name"]]
    return None


def trainjob_pod(trainjob: dict) -> tuple[dict, dict]:
    """(pod spec, container) that runtimePatches give the runtime's `node` pods."""
    [patch] = trainjob["spec"]["runtimePatches"]
    [node] = [j for j in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"] if j["name"] == "node"]
    pod = node["template"]["spec"]["template"]["spec"]
    [container] = [c for c in pod["containers"] if c["name"] == "node"]
    return pod, container


def env_entries(obj) -> list[dict]:
    """Every env entry anywhere in obj (containers, a TrainJob's trainer)."""
    if isinstance(obj, dict):
        found = list(obj["env"]) if isinstance(obj.get("env"), list) else []
        return found + [e for value in obj.values() for e in env_entries(value)]
    if isinstance(obj, list):
        return [e for item in obj for e in env_entries(item)]
    return []


# ---- the checks, as functions a planted mistake can be fed to -------------------------------------------------------
def schema_error(doc: dict, version: str) -> str | None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return str(e)
    return None


def secret_literals(obj) -> list[str]:
    """Every env entry, anywhere in obj, whose name says it holds a secret but does not take it from a Secret."""
    found = []
    if isinstance(obj, dict):
        name = obj.get("name")
        if isinstance(name, str) and ("value" in obj or "valueFrom" in obj):  # an EnvVar
            if any(word in name.upper() for word in SECRET_WORDS) and (
                    "value" in obj or "secretKeyRef" not in obj.get("valueFrom", {})):
                found.append(name)
        for value in obj.values():
            found += secret_literals(value)
    elif isinstance(obj, list):
        for item in obj:
            found += secret_literals(item)
    return found


def trainjob_problems(doc: dict) -> list[str]:
    """What Kubeflow Trainer's torch-distributed runtime needs of a TrainJob and what would undo its PET_* values."""
    problems = []
    if doc.get("apiVersion") != TRAINJOB_API or doc.get("kind") != "TrainJob":
        problems.append(f"not a {TRAINJOB_API} TrainJob")
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
        problems.append(f"metadata.name {name!r} is not a DNS label")
    spec = doc.get("spec", {})
    if spec.get("runtimeRef", {}).get("name") != "torch-distributed":
        problems.append("spec.runtimeRef.name is not torch-distributed")
    trainer = spec.get("trainer", {})
    nodes = trainer.get("numNodes")
    if type(nodes) is not int or nodes < 1:
        problems.append(f"spec.trainer.numNodes {nodes!r} is not an int >= 1")
    if not isinstance(trainer.get("image"), str) or not trainer["image"]:
        problems.append("spec.trainer.image is missing")
    reserved = sorted(set(PET_FLAGS.values()) & {e.get("name") for e in trainer.get("env", [])})
    if reserved:
        problems.append(f"spec.trainer.env sets {reserved}, which the runtime sets (and refuses)")
    argv = torchrun_argv([*trainer.get("command", []), *trainer.get("args", [])])
    if argv is None:
        problems.append("spec.trainer.command does not run torchrun")
        return problems
    # values torchrun cannot get from anywhere else (node_rank and master_port must parse as numbers)
    sentinels = {"PET_NNODES": "7", "PET_NPROC_PER_NODE": "5", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "pet-addr",
                 "PET_MASTER_PORT": "4321"}
    try:
        args = parse_torchrun(argv, sentinels)
    except SystemExit:
        problems.append(f"torchrun does not accept {argv}")
        return problems
    overridden = [flag for flag, env in PET_FLAGS.items() if str(getattr(args, flag)) != sentinels[env]]
    if overridden or args.standalone or args.rdzv_endpoint or args.rdzv_backend != "static":
        problems.append(f"torchrun's rendezvous flags override the runtime's PET_* values: {overridden or argv}")
    if PurePosixPath(args.training_script).name != "train_single_gpu.py":
        problems.append(f"torchrun starts {args.training_script}, not train_single_gpu.py")
    return problems


def job_problems(job: dict, service: dict, pvc: dict) -> list[str]:
    """Where the Job, its headless Service and the volume claim must agree for pod 0 to be found and a run to resume."""
    problems = []
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container, name, service_name = job_container(job), job["metadata"]["name"], service["metadata"]["name"]
    env = env_list(container)
    value = {k: e.get("value") for k, e in env.items()}
    if service["spec"].get("clusterIP") != "None" or service["spec"].get("publishNotReadyAddresses") is not True:
        problems.append("the Service is not headless with publishNotReadyAddresses")
    if pod.get("subdomain") != service_name:
        problems.append(f"subdomain {pod.get('subdomain')!r} is not the Service's name {service_name!r}")
    labels = job["spec"]["template"]["metadata"].get("labels", {})
    if not service["spec"].get("selector") or service["spec"]["selector"].items() - labels.items():
        problems.append(f"the Service's selector {service['spec'].get('selector')} does not match the pods {labels}")
    if value.get("MASTER_ADDR") != f"{name}-0.{service_name}":
        problems.append(f"MASTER_ADDR {value.get('MASTER_ADDR')!r} is not {name}-0.{service_name}")
    ports = {p["port"] for p in service["spec"].get("ports", [])}
    container_ports = {p["containerPort"] for p in container.get("ports", [])}
    if value.get("MASTER_PORT") is None or not {int(value["MASTER_PORT"])} <= ports & container_ports:
        problems.append(f"MASTER_PORT {value.get('MASTER_PORT')!r} is not the Service's and the container's port")
    if spec.get("completionMode") != "Indexed":
        problems.append("completionMode is not Indexed")
    if not (spec.get("completions") == spec.get("parallelism") == int(value.get("NNODES") or 0) >= 1):
        problems.append(f"completions {spec.get('completions')}, parallelism {spec.get('parallelism')} and NNODES "
                        f"{value.get('NNODES')} differ")
    rank = env.get("NODE_RANK", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    if rank != f"metadata.annotations['{COMPLETION_INDEX}']":
        problems.append(f"NODE_RANK comes from {rank!r}, not the completion index")
    gpus = {k: v for k, v in container.get("resources", {}).get("limits", {}).items() if k in GPU_RESOURCES}
    if list(gpus.values()) != [int(value.get("GPUS_PER_NODE") or 0)]:
        problems.append(f"the GPU limits {gpus} are not one GPUS_PER_NODE={value.get('GPUS_PER_NODE')}")
    if pod.get("restartPolicy") != "OnFailure" and not (pod.get("restartPolicy") == "Never"
                                                        and spec.get("backoffLimitPerIndex")):
        problems.append(f"restartPolicy {pod.get('restartPolicy')}: a failed pod would not be restarted")
    if not spec.get("backoffLimit", 6) >= 1:
        problems.append("backoffLimit 0: no restart")
    problems += volume_problems(pod, container, [*container.get("command", []), *container.get("args", [])], pvc,
                                name)
    return problems


def volume_problems(pod: dict, container: dict, command: list[str], pvc: dict, job_name: str) -> list[str]:
    """/dev/shm in memory; the output folder on the ReadWriteMany claim, one folder per job, resumed at every start."""
    problems = []
    shm = mounted_claim(pod, container, "/dev/shm")
    if not shm or shm[0] != "/dev/shm" or shm[1].get("emptyDir", {}).get("medium") != "Memory":
        problems.append("/dev/shm is not a memory-backed emptyDir")
    output_dir = flag_value(command, "output_dir")
    on = mounted_claim(pod, container, output_dir) if output_dir else None
    if not on or on[1].get("persistentVolumeClaim", {}).get("claimName") != pvc["metadata"]["name"]:
        problems.append(f"--output_dir {output_dir} is not on the claim {pvc['metadata']['name']}")
    elif PurePosixPath(output_dir).name != job_name:
        problems.append(f"--output_dir {output_dir} is not the job's own folder ({job_name})")
    if "ReadWriteMany" not in pvc["spec"]["accessModes"]:
        problems.append("the claim is not ReadWriteMany")
    if not any(arg == "--resume" or arg.startswith("--resume=") for arg in command):
        problems.append("no --resume: a restarted pod would refuse the run folder")
    return problems


# ---- a pod's environment and command line, as Kubernetes makes them --------------------------------------------------
def expand(text: str, mapping: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion (k8s.io/kubernetes third_party/forked/golang/expansion): $(NAME) becomes the value
    when NAME is defined and stays as it is otherwise; $$ is a literal $; any other $ is kept."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                close = text.find(")", i + 2)
                if close != -1:
                    name = text[i + 2:close]
                    out.append(mapping.get(name, f"$({name})"))
                    i = close + 1
                    continue
                out.append("$(")
                i += 2
                continue
            out.append("$" + nxt)
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def pod_env(job: dict, index: int, secrets: dict[str, dict[str, str]], replace: dict[str, str]) -> dict[str, str]:
    """The container's environment in pod `index`: the env list in order, each value expanded with the ones before
    it, the downward API and Secrets resolved; `replace` swaps a literal value (the substitutions this test states);
    then JOB_COMPLETION_INDEX, which the Job controller appends to every container of an Indexed Job."""
    name = job["metadata"]["name"]
    meta = {"annotations": {COMPLETION_INDEX: str(index)},
            "labels": {**job["spec"]["template"]["metadata"].get("labels", {}), "batch.kubernetes.io/job-name": name,
                       "job-name": name, COMPLETION_INDEX: str(index)}}
    env: dict[str, str] = {}
    for entry in job_container(job).get("env", []):
        key = entry["name"]
        if key in replace:
            env[key] = replace[key]
        elif "value" in entry:
            env[key] = expand(entry["value"], env)
        elif "fieldRef" in entry["valueFrom"]:
            path = entry["valueFrom"]["fieldRef"]["fieldPath"]
            match = re.fullmatch(r"metadata\.(annotations|labels)\['([^']+)'\]", path)
            if not match:
                raise ValueError(f"this test does not resolve fieldPath {path}")
            env[key] = meta[match[1]][match[2]]
        elif "secretKeyRef" in entry["valueFrom"]:
            ref = entry["valueFrom"]["secretKeyRef"]
            if ref["key"] in secrets.get(ref["name"], {}):
                env[key] = secrets[ref["name"]][ref["key"]]
            elif not ref.get("optional"):
                raise ValueError(f"Secret {ref['name']} is missing: Kubernetes would not start the pod")
        else:
            raise ValueError(f"this test does not resolve {entry}")
    env.setdefault("JOB_COMPLETION_INDEX", str(index))
    return env


def pod_command(job: dict, env: dict[str, str]) -> list[str]:
    container = job_container(job)
    return [expand(word, env) for word in [*container.get("command", []), *container.get("args", [])]]


# ---- fast tests ----------------------------------------------------------------------------------------------------
def test_the_recipes_hold_a_job_its_service_a_claim_and_a_trainjob():
    kinds = sorted(doc["kind"] for _, doc in documents())
    assert kinds == ["Job", "PersistentVolumeClaim", "Service", "TrainJob"]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_core_object_validates_against_the_kubernetes_schema(version):
    core = [(file, doc) for file, doc in documents() if doc["apiVersion"] != TRAINJOB_API]
    assert {doc["kind"] for _, doc in core} == {"Job", "Service", "PersistentVolumeClaim"}
    for file, doc in core:
        assert schema_error(doc, version) is None, f"{file}: {doc['kind']}: {schema_error(doc, version)}"


def test_the_schema_check_catches_a_misspelled_field_and_a_wrong_type():
    version = kubernetes_validate.latest_version()
    misspelled = copy.deepcopy(the("Job"))
    misspelled["spec"]["completion"] = misspelled["spec"].pop("completions")
    wrong_type = copy.deepcopy(the("Job"))
    wrong_type["spec"]["parallelism"] = "two"
    nested = copy.deepcopy(the("Job"))
    job_container(nested)["env"][0]["valueFrom"]["fieldRef"]["fieldpath"] = "metadata.name"
    for planted in (misspelled, wrong_type, nested):
        assert schema_error(planted, version) is not None


def test_the_trainjob_has_what_the_torch_runtime_needs():
    trainjob = the("TrainJob")
    assert trainjob_problems(trainjob) == []
    trainer = trainjob["spec"]["trainer"]
    # with the runtime's variables set, torchrun's own parser ends up with exactly them
    pet = {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": "auto", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": f"{trainjob['metadata']['name']}-node-0-0.{trainjob['metadata']['name']}",
           "PET_MASTER_PORT": "29400"}
    args = parse_torchrun(torchrun_argv([*trainer["command"], *trainer["args"]]), pet)
    assert (args.nnodes, args.nproc_per_node, args.node_rank, args.master_addr, args.master_port) == (
        pet["PET_NNODES"], "auto", 1, pet["PET_MASTER_ADDR"], 29400)
    problems = volume_problems(*trainjob_pod(trainjob), [*trainer["command"], *trainer["args"]], the(
        "PersistentVolumeClaim"), trainjob["metadata"]["name"])
    assert problems == []
    gpus = [k for k in trainer["resourcesPerNode"]["limits"] if k in GPU_RESOURCES]
    assert len(gpus) == 1  # the runtime counts GPUs to set PET_NPROC_PER_NODE
    # the pod spec the runtimePatches and the trainer give the runtime's pods is made of core types: check them too
    pod, container = copy.deepcopy(trainjob_pod(trainjob))
    container.update(image=trainer["image"], command=trainer["command"], args=trainer["args"], env=trainer["env"],
                     resources=trainer["resourcesPerNode"])
    as_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": trainjob["metadata"]["name"]}, "spec": pod}
    for version in SCHEMA_VERSIONS:
        assert schema_error(as_pod, version) is None, schema_error(as_pod, version)


@pytest.mark.parametrize("mistake", ["runtime", "nodes", "nodes_text", "image", "rendezvous", "standalone", "pet",
                                     "python"])
def test_the_trainjob_check_catches_a_planted_mistake(mistake):
    planted = copy.deepcopy(the("TrainJob"))
    trainer = planted["spec"]["trainer"]
    if mistake == "runtime":
        planted["spec"]["runtimeRef"]["name"] = "torch-distributed-typo"
    elif mistake == "nodes":
        trainer["numNodes"] = 0
    elif mistake == "nodes_text":
        trainer["numNodes"] = "2"
    elif mistake == "image":
        del trainer["image"]
    elif mistake == "rendezvous":
        trainer["args"] = ["--nnodes", "2", *trainer["args"]]
    elif mistake == "standalone":
        trainer["args"] = ["--standalone", *trainer["args"]]
    elif mistake == "pet":
        trainer["env"].append({"name": "PET_NNODES", "value": "2"})
    elif mistake == "python":
        trainer["command"] = ["python3"]
    assert trainjob_problems(planted) != []


def test_no_manifest_holds_a_secret_value():
    for file, doc in documents():
        assert secret_literals(doc) == [], file
    for planted in ({"spec": {"containers": [{"env": [{"name": "WANDB_API_KEY", "value": "abc"}]}]}},
                    {"trainer": {"env": [{"name": "HF_TOKEN", "valueFrom": {"configMapKeyRef": {"name": "x"}}}]}}):
        assert secret_literals(planted) != []


def test_the_secret_command_in_the_comments_makes_the_secret_the_manifests_read():
    for file in ("train-job.yaml", "trainjob.yaml"):
        text = (RECIPES / file).read_text()
        made = re.search(r"kubectl create secret generic (\S+) --from-literal=(\S+?)=", text)
        assert made, file
        [doc] = [doc for name, doc in documents() if name == file and doc["kind"] in ("Job", "TrainJob")]
        refs = [e["valueFrom"]["secretKeyRef"] for e in env_entries(doc) if "secretKeyRef" in e.get("valueFrom", {})]
        assert refs and all((r["name"], r["key"], r.get("optional")) == (made[1], made[2], True) for r in refs), file


def test_the_job_its_service_and_the_claim_agree():
    job, service, pvc = the("Job"), the("Service"), the("PersistentVolumeClaim")
    assert job_problems(job, service, pvc) == []
    # each pod's command, expanded by Kubernetes, is the static rendezvous torchrun needs
    nodes = job["spec"]["completions"]
    for index in range(nodes):
        args = parse_torchrun(torchrun_argv(pod_command(job, pod_env(job, index, {}, {}))))
        assert (int(args.nnodes), args.node_rank, args.master_addr) == (nodes, index, env_list(job_container(job))[
            "MASTER_ADDR"]["value"])
        assert PurePosixPath(args.training_script).name == "train_single_gpu.py"


@pytest.mark.parametrize("mistake", ["subdomain", "selector", "nodes", "gpus", "master", "shm", "output", "resume"])
def test_the_agreement_check_catches_a_planted_mistake(mistake):
    job, service, pvc = copy.deepcopy(the("Job")), the("Service"), the("PersistentVolumeClaim")
    pod, container = job["spec"]["template"]["spec"], job_container(job)
    env = env_list(container)
    if mistake == "subdomain":
        pod["subdomain"] = "other"
    elif mistake == "selector":
        job["spec"]["template"]["metadata"]["labels"] = {"app": "other"}
    elif mistake == "nodes":
        job["spec"]["parallelism"] += 1
    elif mistake == "gpus":
        env["GPUS_PER_NODE"]["value"] = "4"
    elif mistake == "master":
        env["MASTER_ADDR"]["value"] = f"{job['metadata']['name']}-1.{service['metadata']['name']}"
    elif mistake == "shm":
        pod["volumes"] = [v for v in pod["volumes"] if "emptyDir" not in v] + [{"name": "dshm", "emptyDir": {}}]
    elif mistake == "output":
        container["args"] = [*container["args"], "--output_dir=/tmp/run"]
    elif mistake == "resume":
        container["args"] = [a for a in container["args"] if not a.startswith("--resume")]
    assert job_problems(job, service, pvc) != []


def test_the_program_is_where_the_image_keeps_it():
    """The recipes run train_single_gpu.py from the image's working directory, where the image build copies it."""
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert workdirs[-1] == "/workspace"
    assert re.search(r"cp \S*train_single_gpu\.py .*/workspace/", (ROOT / "docker" / "setup.sh").read_text())
    assert (ROOT / "train_single_gpu.py").is_file()  # the same file in this repository, which the test below runs


def test_torchrun_lets_the_processes_save_within_the_pods_grace_period():
    """torch 2.13's torchrun kills its training processes TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 when unset) after
    passing SIGTERM on; the kubelet kills the pod terminationGracePeriodSeconds (30 when unset) after its SIGTERM."""
    job, trainjob = the("Job"), the("TrainJob")
    for pod, env in ((job["spec"]["template"]["spec"], env_list(job_container(job))),
                     (trainjob_pod(trainjob)[0], {e["name"]: e for e in trainjob["spec"]["trainer"]["env"]})):
        shutdown = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"])
        assert 30 < shutdown < pod.get("terminationGracePeriodSeconds", 30), (shutdown, pod)


def test_kubernetes_expansion_matches_kubelet():
    mapping = {"VAR_A": "A", "VAR_B": "B", "EMPTY": ""}
    cases = {"$(VAR_A)": "A", "___$(VAR_B)___": "___B___", "$(VAR_A)-$(VAR_B)": "A-B", "$(EMPTY)": "",
             "$(UNKNOWN)": "$(UNKNOWN)", "$$(VAR_A)": "$(VAR_A)", "$$$(VAR_A)": "$A", "$$": "$", "$": "$",
             "$(VAR_A": "$(VAR_A", "a$b": "a$b", "$()": "$()"}
    assert {text: expand(text, mapping) for text in cases} == cases


def test_each_pod_gets_its_rank_from_the_completion_index():
    job = the("Job")
    envs = [pod_env(job, index, {}, {}) for index in range(job["spec"]["completions"])]
    assert [(e["NODE_RANK"], e["JOB_COMPLETION_INDEX"]) for e in envs] == [("0", "0"), ("1", "1")]
    assert all("WANDB_API_KEY" not in e for e in envs)  # the optional Secret is absent: wandb logs offline
    assert pod_env(job, 0, {"wandb": {"api-key": "k"}}, {})["WANDB_API_KEY"] == "k"


# ---- two pods on this machine --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (torchrun's workers), from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state_and_parent = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        if int(state_and_parent[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


class Pods:
    """Every "pod" started at once, each a torchrun launcher with its output in logs/pod-N.log."""

    def __init__(self, commands: list[list[str]], envs: list[dict], logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = [logs / f"pod-{index}.log" for index in range(len(commands))]
        self.procs = []
        for cmd, env, log in zip(commands, envs, self.logs):
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 150) -> list[tuple[int, str]]:
        """(exit code, output) of each; on a time-out every one is stopped with SIGTERM, which torchrun passes on to
        its workers."""
        deadline = time.monotonic() + timeout
        try:
            for proc in self.procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in self.procs:
                proc.wait(timeout=60)
            raise
        return [(proc.returncode, log.read_text()) for proc, log in zip(self.procs, self.logs)]


def wait_for_lines(path: Path, lines: int, pods: Pods, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or len(path.read_text().splitlines()) < lines:
        if time.monotonic() > deadline or any(proc.poll() is not None for proc in pods.procs):
            raise AssertionError(f"{path} never reached {lines} lines: " + "\n\n".join(
                log.read_text()[-3000:] for log in pods.logs))
        time.sleep(0.05)


@pytest.mark.slow
def test_the_jobs_command_trains_on_two_pods_and_a_restart_after_a_crash_resumes(tmp_path):
    """The Job's command and env exactly as Kubernetes builds them for pod 0 and pod 1, run here as two torchrun
    launchers side by side. Stated substitutions: MASTER_ADDR <job>-0.<service> -> 127.0.0.1 (no cluster DNS here),
    GPUS_PER_NODE -> 1 and MASTER_PORT -> a free port (one machine, no GPUs); `python3` -> this interpreter and the
    image's /workspace -> this repository (where train_single_gpu.py is); the claim's mount -> a folder both pods
    share. The CPU-sized flags are appended after the manifest's own (argparse: the last value wins).

    Pod 1's training process is killed (as the out-of-memory killer would); pod 1's torchrun then fails, pod 0's
    next collective fails, so both containers fail and restartPolicy OnFailure restarts them: with the same command
    they meet again and resume from the latest checkpoint, and every step is in metrics.jsonl once."""
    job, service = the("Job"), the("Service")
    name, container = job["metadata"]["name"], job_container(job)
    env = env_list(container)
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{service['metadata']['name']}"
    assert int(env["MASTER_PORT"]["value"]) == service["spec"]["ports"][0]["port"]
    replace = {"MASTER_ADDR": "127.0.0.1", "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port())}
    nodes = job["spec"]["completions"]
    assert nodes == 2 and container["command"][0] == "python3"  # the image's interpreter, as in its CMD

    pod, claim = job["spec"]["template"]["spec"], tmp_path / "claim"  # the ReadWriteMany volume both pods mount
    output_dir = flag_value(container["args"], "output_dir")
    mount_path, _ = mounted_claim(pod, container, output_dir)
    local_output = claim / PurePosixPath(output_dir).relative_to(mount_path)
    metrics, steps = local_output / "metrics.jsonl", 60

    def start(logs: str) -> Pods:
        commands, envs = [], []
        for index in range(nodes):
            pod_vars = pod_env(job, index, secrets={}, replace=replace)  # no Secret `wandb`: it is optional
            cpu = ["--model_size=tiny", "--use_chinese=false", f"--data_path={CLASSIC_POEMS}", "--bf16=false",
                   *TINY_SHAPE, "--log_interval=1", f"--max_steps={steps}", "--save_interval=5",
                   "--eval_interval=100", "--dist_timeout=60",
                   f"--cache_dir={tmp_path / f'cache-{index}'}",  # the image's cache folder is each node's own
                   f"--output_dir={local_output}"]
            commands.append([sys.executable, *pod_command(job, pod_vars)[1:], *cpu])
            base = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PET_"))}
            envs.append({**base, **pod_vars, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                         "HOME": str(tmp_path / f"home-{index}")})
        return Pods(commands, envs, tmp_path / logs)

    first = start("first")
    wait_for_lines(metrics, 7, first)  # a checkpoint (step 5) is saved, training goes on
    workers = children(first.procs[1].pid)
    assert workers
    killed_at = time.monotonic()
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    crashed = first.wait(timeout=90)
    assert time.monotonic() - killed_at < 45  # pod 0 noticed the lost peer; it did not wait for --dist_timeout
    assert [code != 0 for code, _ in crashed] == [True, True], "\n\n".join(log[-3000:] for _, log in crashed)
    assert "--resume: no checkpoint in" in crashed[0][1] and "x 2 processes" in crashed[0][1]  # the first start
    assert "x 2 processes" not in crashed[1][1]  # pod 1 holds rank 1, which prints nothing of the run

    again = start("again").wait()  # both containers restart with the same command
    assert [code for code, _ in again] == [0, 0], "\n\n".join(log[-3000:] for _, log in again)
    resumed = re.search(r"resumed from \S+ at step (\d+)", again[0][1])
    assert resumed and 5 <= int(resumed[1]) < steps and int(resumed[1]) % 5 == 0, again[0][1][-3000:]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train/loss" in line]
    assert logged == list(range(1, steps + 1))  # the steps after the checkpoint were trained again, logged once
    assert json.loads((local_output / "config.json").read_text())["world_size"] == 2
