# The operator image the Helm chart deploys (values operator.image).
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t turnrelay-operator:0.1.0 .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY relay relay
COPY twisted twisted
# kopf and the Kubernetes client, at the versions setup.cfg's `operator` extra names.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[operator]"

FROM python:3.11-slim-bookworm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "turnrelay[operator]" && rm -rf /wheels
# A plain folder of uniquely named modules, never a package named `operator` (it would shadow
# the standard library's); kopf puts the file's folder on sys.path.
COPY operator/turnregion_operator.py operator/turnregion_manifests.py /app/
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["kopf"]
CMD ["run", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz", "/app/turnregion_operator.py"]
