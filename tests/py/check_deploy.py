"""Offline checks of deploy/ (no container engine, no cluster): run by tests/it/deploy.rs.

    check_deploy.py REPO OUT_DIR

- every YAML file under deploy/ parses, the Grafana dashboard is JSON;
- compose: build contexts, Dockerfiles and every mounted file exist, and the paths
  Prometheus and Grafana read inside their containers are mounted;
- Dockerfile: every COPY source (not --from) exists and is not excluded by .dockerignore;
- deploy/k8s: built-in kinds pass kubernetes-validate (strict) for a current Kubernetes;
  KEDA and Prometheus Operator kinds pass the openAPIV3Schema of their vendored CRDs
  (tests/schemas/crds, unknown fields refused); any other kind fails;
- deploy/k8s facts: termination grace above shutdown_timeout, probes on /healthz and
  /readyz, non-root, read-only root filesystem, the PrometheusRule holds alerts.yml's
  groups, KEDA watches the ConfigMap's delivery queue;
- every alert's runbook_url points to a heading of docs/operations.md;
- the scrape job the alerts select (job="...") is the job courier is scraped as in
  deploy/compose/prometheus.yml and through the ServiceMonitor (its jobLabel on the
  Service, else the Service's name).

Writes OUT_DIR/configs.json: each courier configuration found in deploy/ (its origin,
its text with webhook URL hosts made "localhost" so that `courier check` resolves
nothing off this machine, and values for its ${VAR}s), for the Rust test to run
`courier check` on. Prints one line per failure and exits 1 if there is any.
"""

import copy
import json
import os
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.37.0"
CRDS = {
    ("keda.sh", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("keda.sh", "TriggerAuthentication"): "keda.sh_triggerauthentications.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}

failures = []


def fail(msg):
    failures.append(msg)


def seconds(duration):
    """A humantime duration such as "30s", "2m", "1h30m" in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*(ms|s|m|h|d)", duration):
        total += int(number) * units[unit]
    return total


def localhost_urls(text):
    return re.sub(r'(https?://)([^/:"\s]+)', r"\1localhost", text)


def strict(schema):
    """The schema with unknown properties refused, as the API server prunes them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            # Go's regexp takes inline flags anywhere, Python's only at the start.
            pattern = node.get("pattern")
            if isinstance(pattern, str) and pattern.startswith("^(?i)"):
                node["pattern"] = "(?i)^" + pattern[len("^(?i)"):]
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    # apiVersion, kind and metadata are checked by the API server itself.
    for key in ("apiVersion", "kind", "metadata"):
        schema.setdefault("properties", {}).setdefault(key, {})
    return schema


def crd_schema(repo, group, kind, version):
    crd = yaml.safe_load(open(os.path.join(repo, "tests/schemas/crds", CRDS[(group, kind)])))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strict(v["schema"]["openAPIV3Schema"])
    raise KeyError(f"{kind}: no version {version} in its CRD")


def check_yaml(repo):
    docs = {}
    for base, _, files in os.walk(os.path.join(repo, "deploy")):
        for name in files:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, repo)
            if name.endswith((".yml", ".yaml")):
                try:
                    docs[rel] = [d for d in yaml.safe_load_all(open(path)) if d is not None]
                except yaml.YAMLError as e:
                    fail(f"{rel}: not YAML: {e}")
            elif name.endswith(".json"):
                try:
                    json.load(open(path))
                except ValueError as e:
                    fail(f"{rel}: not JSON: {e}")
    return docs


def check_compose(repo, compose):
    base = os.path.join(repo, "deploy/compose")
    mounted = {}
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = os.path.normpath(os.path.join(base, build["context"]))
            if not os.path.isdir(context):
                fail(f"compose {name}: build context {build['context']} missing")
            if not os.path.isfile(os.path.join(context, build.get("dockerfile", "Dockerfile"))):
                fail(f"compose {name}: Dockerfile missing")
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                if not os.path.exists(os.path.join(base, source)):
                    fail(f"compose {name}: mounted {source} missing")
                mounted.setdefault(name, []).append((target, os.path.normpath(os.path.join(base, source))))
        for dep in service.get("depends_on", {}):
            if dep not in compose["services"]:
                fail(f"compose {name}: depends on unknown service {dep}")

    def resolve(service, path):
        for target, source in mounted.get(service, []):
            if path == target or path.startswith(target.rstrip("/") + "/"):
                return source + path[len(target):]
        return None

    prometheus = yaml.safe_load(open(resolve("prometheus", "/etc/prometheus/prometheus.yml")))
    for rule_file in prometheus["rule_files"]:
        found = resolve("prometheus", rule_file)
        if not found or not os.path.isfile(found):
            fail(f"compose prometheus: rule file {rule_file} not mounted")
    providers = resolve("grafana", "/etc/grafana/provisioning/dashboards/courier.yml")
    for provider in yaml.safe_load(open(providers))["providers"]:
        path = provider["options"]["path"]
        found = resolve("grafana", path + "/courier.json")
        if not found or not os.path.isfile(found):
            fail(f"compose grafana: dashboard path {path} holds no courier.json")
    if seconds(compose["services"]["courier"]["stop_grace_period"]) <= 30:
        fail("compose courier: stop_grace_period must exceed shutdown_timeout (30s)")


def check_dockerfile(repo):
    text = open(os.path.join(repo, "Dockerfile")).read().replace("\\\n", " ")
    ignored = [
        line.strip()
        for line in open(os.path.join(repo, ".dockerignore"))
        if line.strip() and not line.startswith("#")
    ]
    copies = 0
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        for source in words[1:-1]:
            copies += 1
            if not os.path.exists(os.path.join(repo, source)):
                fail(f"Dockerfile: COPY {source}: missing")
            if any(source == p or source.startswith(p + "/") for p in ignored if not p.startswith("!")):
                fail(f"Dockerfile: COPY {source}: excluded by .dockerignore")
    if copies == 0:
        fail("Dockerfile: no COPY found")
    for needed in ("HEALTHCHECK", "/healthz", "ENTRYPOINT", "USER 65532"):
        if needed not in text:
            fail(f"Dockerfile: no {needed}")


def check_k8s(repo, docs):
    objects = []
    for rel, items in docs.items():
        if rel.startswith("deploy/k8s/"):
            objects += [(rel, o) for o in items]
    kinds = {}
    for rel, obj in objects:
        kinds.setdefault(obj["kind"], obj)
        group, _, version = obj["apiVersion"].rpartition("/")
        if (group, obj["kind"]) in CRDS:
            try:
                validator = jsonschema.Draft7Validator(crd_schema(repo, group, obj["kind"], version))
                validator.validate(obj)
                print(f"{rel}: {obj['kind']} passes its CRD schema")
            except jsonschema.ValidationError as e:
                fail(f"{rel}: {obj['kind']}: {e.message} at {list(e.absolute_path)}")
        else:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, True)
                print(f"{rel}: {obj['kind']} passes kubernetes-validate {KUBERNETES_VERSION}")
            except kubernetes_validate.SchemaNotFoundError:
                fail(f"{rel}: {obj['kind']}: no schema to check it against")
            except kubernetes_validate.ValidationError as e:
                fail(f"{rel}: {obj['kind']}: {e.message} at {list(e.path)}")
    for kind in ("Deployment", "ConfigMap", "Secret", "Service", "ServiceMonitor",
                 "PrometheusRule", "ScaledObject"):
        if kind not in kinds:
            fail(f"deploy/k8s: no {kind}")
    if failures:
        return kinds

    deployment = kinds["Deployment"]["spec"]["template"]["spec"]
    config_text = kinds["ConfigMap"]["data"]["courier.toml"]
    timeout = re.search(r'^shutdown_timeout\s*=\s*"([^"]+)"', config_text, re.M)
    shutdown = seconds(timeout.group(1)) if timeout else 30
    if deployment["terminationGracePeriodSeconds"] <= shutdown:
        fail("Deployment: terminationGracePeriodSeconds must exceed shutdown_timeout")
    container = deployment["containers"][0]
    if container["livenessProbe"]["httpGet"]["path"] != "/healthz":
        fail("Deployment: liveness probe not on /healthz")
    if container["readinessProbe"]["httpGet"]["path"] != "/readyz":
        fail("Deployment: readiness probe not on /readyz")
    if not deployment["securityContext"].get("runAsNonRoot"):
        fail("Deployment: not runAsNonRoot")
    if not container["securityContext"].get("readOnlyRootFilesystem"):
        fail("Deployment: root filesystem not read-only")
    alerts = yaml.safe_load(open(os.path.join(repo, "deploy/prometheus/alerts.yml")))
    if kinds["PrometheusRule"]["spec"]["groups"] != alerts["groups"]:
        fail("PrometheusRule: its groups differ from deploy/prometheus/alerts.yml")
    prefix = re.search(r'^queue_prefix\s*=\s*"([^"]+)"', config_text, re.M)
    queue = (prefix.group(1) if prefix else "courier") + ".deliver"
    trigger = kinds["ScaledObject"]["spec"]["triggers"][0]["metadata"]
    if trigger["queueName"] != queue:
        fail(f"ScaledObject: watches {trigger['queueName']}, the delivery queue is {queue}")
    return kinds


def check_runbooks(repo):
    headings = set()
    for line in open(os.path.join(repo, "docs/operations.md")):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            headings.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    alerts = yaml.safe_load(open(os.path.join(repo, "deploy/prometheus/alerts.yml")))
    for group in alerts["groups"]:
        for rule in group["rules"]:
            url = rule["annotations"]["runbook_url"]
            page, _, anchor = url.partition("#")
            if not page.endswith("docs/operations.md") or anchor not in headings:
                fail(f"alert {rule['alert']}: runbook {url} is no heading of docs/operations.md")


def check_scrape_job(repo, kinds):
    text = open(os.path.join(repo, "deploy/prometheus/alerts.yml")).read()
    jobs = set(re.findall(r'job="([^"]+)"', text))
    if len(jobs) != 1:
        fail(f"alerts.yml: the alerts select {sorted(jobs)}, not one scrape job")
        return
    job = jobs.pop()
    prometheus = yaml.safe_load(open(os.path.join(repo, "deploy/compose/prometheus.yml")))
    if job not in [c["job_name"] for c in prometheus["scrape_configs"]]:
        fail(f"deploy/compose/prometheus.yml: no scrape job {job}, which the alerts select")
    monitor, service = kinds.get("ServiceMonitor"), kinds.get("Service")
    if monitor and service:
        label = monitor["spec"].get("jobLabel")
        k8s_job = service["metadata"].get("labels", {}).get(label) or service["metadata"]["name"]
        if k8s_job != job:
            fail(f"ServiceMonitor: scrapes courier as job {k8s_job}, the alerts select {job}")


def configs(repo, docs, kinds):
    out = []

    def add(origin, text, env):
        out.append({"origin": origin, "text": localhost_urls(text), "env": env})

    def read(rel):
        return open(os.path.join(repo, rel)).read()

    if "ConfigMap" in kinds:
        secret = kinds.get("Secret", {}).get("stringData", {})
        add("deploy/k8s/configmap.yaml", kinds["ConfigMap"]["data"]["courier.toml"], secret)
    compose = docs["deploy/compose/compose.yaml"][0]
    add("deploy/compose/courier.toml", read("deploy/compose/courier.toml"),
        compose["services"]["courier"]["environment"])
    add("deploy/local/courier.toml", read("deploy/local/courier.toml"),
        {"WEBHOOK_SECRET": "local-demo-secret"})
    add("deploy/courier.toml.example", read("deploy/courier.toml.example"),
        {"RABBITMQ_PASSWORD": "x", "ACME_WEBHOOK_SECRET": "x", "ACME_TOKEN": "x"})
    return out


def main(repo, out_dir):
    docs = check_yaml(repo)
    check_compose(repo, docs["deploy/compose/compose.yaml"][0])
    check_dockerfile(repo)
    kinds = check_k8s(repo, docs)
    check_runbooks(repo)
    check_scrape_job(repo, kinds)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "configs.json"), "w") as f:
        json.dump(configs(repo, docs, kinds), f)
    for failure in failures:
        print("FAIL " + failure)
    sys.exit(1 if failures else 0)


main(sys.argv[1], sys.argv[2])
