# qnbd: an NBD server for qcow2 images.
#   docker build -t qnbd .
#   docker run -p 10809:10809 -v /srv/images:/var/lib/qnbd -v ./config/qnbd.toml:/etc/qnbd/qnbd.toml:ro qnbd

# Build stage: wheels for qnbd and its `psk` extra. sslpsk3 (TLS-PSK, tls-creds-psk, on
# Python < 3.13) ships only as source, so it is compiled here against OpenSSL's headers
# and the compiler stays out of the runtime image.
FROM python:3.11-slim-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY qnbd ./qnbd
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[psk]"

FROM python:3.11-slim-bookworm

# qemu-utils: qemu-img for creating and checking images; libnbd-bin: nbdinfo for health checks.
# Not pinned: the base image tracks Debian stable, whose updates are security fixes we want.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends qemu-utils libnbd-bin \
    && rm -rf /var/lib/apt/lists/*

# Exactly the wheels built above (qnbd, its dependencies, sslpsk3); libssl3, which
# sslpsk3 links, is already in the base image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl

RUN useradd --system --uid 10809 --home-dir /var/lib/qnbd --create-home qnbd \
    && mkdir -p /etc/qnbd \
    && chown qnbd:qnbd /var/lib/qnbd
COPY config/qnbd.toml /etc/qnbd/qnbd.toml

USER 10809:10809
WORKDIR /var/lib/qnbd
EXPOSE 10809
CMD ["qnbd", "serve", "--config", "/etc/qnbd/qnbd.toml"]
