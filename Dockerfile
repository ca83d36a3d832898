# csi-rbd: the CSI driver image (controller and node plugin).
#
#   docker build -t csi-rbd:0.1.0 .
#   buildah bud --isolation chroot -t csi-rbd:0.1.0 .
#   (no registry? --build-arg DEBIAN_IMAGE=<a local bookworm image, e.g. from debootstrap>)
#
# Stage 1 builds the csi-rbd wheel and the wheels of its dependencies; stage 2
# is Debian bookworm with the tools the data path runs (mkfs, mount, losetup,
# FUSE, qemu-img) and Ceph's client libraries, and installs those wheels
# offline into a virtualenv that also sees Debian's python3-rados/python3-rbd.
#
# The image runs as an unprivileged user (UID 10001). That suits the
# controller (it only talks to the engine and the API server). The node
# plugin mounts filesystems, sets up loop devices and FUSE, and so must run
# as root and privileged: the Helm chart's node DaemonSet sets
# securityContext {privileged: true, runAsUser: 0} for that container.

ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# Debian's own archive already fixes the versions for this release; pinning
# every package again would break the build at each Debian point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY csi_rbd ./csi_rbd
# The driver's wheel (built in an isolated environment with the build
# backend pyproject.toml names) and every dependency's wheel.
RUN python3 -m pip wheel --wheel-dir /wheels .

FROM ${DEBIAN_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="csi-rbd" \
      org.opencontainers.image.description="Kubernetes CSI driver for RBD block volumes (native and Ceph engines)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/csi-rbd/bin:$PATH \
    CSI_RBD_DATA_DIR=/var/lib/csi-rbd \
    FUSE_LIBRARY_NAME=fuse3
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv \
        e2fsprogs xfsprogs util-linux mount fuse3 libfuse3-3 \
        qemu-utils \
        ceph-common python3-rados python3-rbd \
        tini ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /wheels /tmp/wheels
# --system-site-packages: the venv sees Debian's rados and rbd modules.
RUN python3 -m venv --system-site-packages /opt/csi-rbd \
    && /opt/csi-rbd/bin/pip install --no-index --find-links=/tmp/wheels csi-rbd \
    && rm -rf /tmp/wheels \
    && csi-rbd --version \
    && /opt/csi-rbd/bin/python -c 'import rados, rbd' \
    && groupadd --gid 10001 csi-rbd \
    && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init \
        --home-dir /nonexistent --shell /usr/sbin/nologin csi-rbd \
    && mkdir -p /csi /var/lib/csi-rbd \
    && chown csi-rbd:csi-rbd /csi /var/lib/csi-rbd
USER 10001
WORKDIR /var/lib/csi-rbd
ENTRYPOINT ["/usr/bin/tini", "--", "csi-rbd", "serve"]
CMD ["--endpoint", "unix:///csi/csi.sock"]
