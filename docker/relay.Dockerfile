# The relay image the operator's Deployments run (TurnRegion spec.image).
# Build from the repository root:  docker build -f docker/relay.Dockerfile -t turnrelay:0.1.0 .
# BASE_IMAGE: any Debian-like image with python3 and its venv module (scripts/images.sh builds one
# from Debian's packages alone, under this same name, where no registry is reachable).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS build
# The native UDP data plane (relay/net/dataplane.c, built through cffi by setup.py) needs a C
# compiler and Python's headers, here only: the final stage carries neither.  python3-dev only
# where the base has no Python.h (the python:*-slim images ship theirs).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev $(python3 -c \
        'import os, sysconfig; print("" if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else "python3-dev")') \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.cfg setup.py README.md ./
COPY relay relay
COPY twisted twisted
# One virtualenv holding turnrelay and what it needs, PostgreSQL driver included (accounting
# DSNs), with Twisted's plugin cache written now: the pods' root filesystem is read-only. pip
# itself stays behind: the final stage copies this folder and nothing else.  The build fails
# if the native data plane did not build (checked from /, away from the sources in /src): the
# relay's default is native where it was built.
RUN python3 -m venv /opt/turnrelay \
    && /opt/turnrelay/bin/pip install --no-cache-dir ".[postgresql]" \
    && cd / && /opt/turnrelay/bin/python -c "from relay.net import dataplane; assert dataplane.available(), dataplane.missing()" \
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
