# The relay image the operator's Deployments run (TurnRegion spec.image).
# Build from the repository root:  docker build -f docker/relay.Dockerfile -t turnrelay:0.1.0 .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY relay relay
COPY twisted twisted
# Wheels of turnrelay and everything it needs, PostgreSQL driver included (accounting DSNs).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[postgresql]"

FROM python:3.11-slim-bookworm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "turnrelay[postgresql]" \
    && rm -rf /wheels \
    # Twisted's plugin cache is written on first use; the pods' root filesystem is read-only,
    # so write it now.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd turnrelay --help >/dev/null
# The UID the operator's pod securityContext runs as; state (self-signed certificate) goes to
# /var/lib/turnrelay, an emptyDir in the pod.
USER 10001:10001
EXPOSE 3478/udp 3478/tcp 5349/tcp
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "--logfile=-", "turnrelay"]
