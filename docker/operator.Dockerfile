# The operator image the Helm chart deploys (values operator.image): kopf, the Kubernetes
# client and the operator's two modules, nothing of the relay.
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t turnrelay-operator:0.1.0 .
# BASE_IMAGE: as in relay.Dockerfile.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS build
COPY setup.cfg /src/
# kopf and the Kubernetes client at the versions setup.cfg's `operator` extra names (its one
# list), in a virtualenv the final stage copies without pip. The client's asyncio twin
# (kubernetes.aio, 68 MB of generated code in 37.0) is left out: the operator uses the
# synchronous client, kopf its own aiohttp one.
RUN python3 -c "import configparser; c = configparser.ConfigParser(); c.read('/src/setup.cfg'); \
print(c['options.extras_require']['operator'])" >/src/requirements.txt \
    && python3 -m venv /opt/operator \
    && /opt/operator/bin/pip install --no-cache-dir -r /src/requirements.txt \
    && /opt/operator/bin/pip uninstall -q -y pip setuptools \
    && rm -rf /opt/operator/lib/python3*/site-packages/kubernetes/aio \
    && /opt/operator/bin/python -c "import kopf, kubernetes.dynamic"

FROM ${BASE_IMAGE}
COPY --from=build /opt/operator /opt/operator
# A plain folder of uniquely named modules, never a package named `operator` (it would shadow
# the standard library's); kopf puts the file's folder on sys.path.
COPY operator/turnregion_operator.py operator/turnregion_manifests.py /app/
ENV PATH=/opt/operator/bin:$PATH
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["kopf"]
CMD ["run", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz", "/app/turnregion_operator.py"]
