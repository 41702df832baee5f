# The relay image the operator's Deployments run (TurnRegion spec.image).
# Build from the repository root:  docker build -f docker/relay.Dockerfile -t turnrelay:0.1.0 .
# BASE_IMAGE: any Debian-like image with python3 and its venv module (scripts/images.sh builds one
# from Debian's packages alone, under this same name, where no registry is reachable).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY relay relay
COPY twisted twisted
# One virtualenv holding turnrelay and what it needs, PostgreSQL driver included (accounting
# DSNs), with Twisted's plugin cache written now: the pods' root filesystem is read-only. pip
# itself stays behind: the final stage copies this folder and nothing else.
RUN python3 -m venv /opt/turnrelay \
    && /opt/turnrelay/bin/pip install --no-cache-dir ".[postgresql]" \
    && /opt/turnrelay/bin/twistd turnrelay --help >/dev/null \
    && /opt/turnrelay/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && /opt/turnrelay/bin/pip uninstall -q -y pip setuptools

FROM ${BASE_IMAGE}
COPY --from=build /opt/turnrelay /opt/turnrelay
ENV PATH=/opt/turnrelay/bin:$PATH
# The UID the operator's pod securityContext runs as; state (self-signed certificate) goes to
# /var/lib/turnrelay, an emptyDir in the pod.
USER 10001:10001
EXPOSE 3478/udp 3478/tcp 5349/tcp
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "--logfile=-", "turnrelay"]
