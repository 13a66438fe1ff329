# openkd for CUDA GPU nodes.
# The official vLLM image pins CUDA, PyTorch and vLLM together (0.32, the vLLM version openkd's CPU CI
# runs; tests/test_repo.py keeps this tag, the cpu extra's pin and the gpu extra's range in step);
# openkd adds TRL, DeepSpeed and distilabel on top without replacing them.
# Build: docker build -t openkd .
# Run:   docker run --gpus all --ipc=host --user "$(id -u):$(id -g)" -e HF_TOKEN \
#          -v "$PWD/data:/data" openkd generate --help
# Any uid works: the entrypoint moves the Hugging Face cache (and HOME) under /tmp, with one line
# saying so, when the mounted /data is not writable for it (scripts/docker-entrypoint.sh).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf-cache \
    OPENKD_HOME=/opt/openkd

WORKDIR /opt/openkd
# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
# PIP_BREAK_SYSTEM_PACKAGES: an Ubuntu 24.04 base marks its Python externally managed (PEP 668);
# this image is that Python's only user. Older pips ignore the variable.
COPY pyproject.toml README.md ./
COPY scripts/docker-install.sh scripts/docker-install.sh
RUN PIP_BREAK_SYSTEM_PACKAGES=1 bash scripts/docker-install.sh deps

COPY configs ./configs
COPY openkd ./openkd
COPY scripts/docker-entrypoint.sh /usr/local/bin/openkd-entrypoint
# Ubuntu 24.04 images already hold uid 1000 (`ubuntu`): give it up to openkd's user.
# /data is writable by any uid (sticky, like /tmp) for named volumes and runs without a mount.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 bash scripts/docker-install.sh app \
    && if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi \
    && useradd --create-home --uid 1000 --shell /bin/bash openkd \
    && mkdir -p /data/hf-cache \
    && chown -R openkd:openkd /data \
    && chmod 1777 /data /data/hf-cache \
    && chmod 755 /usr/local/bin/openkd-entrypoint

USER 1000:1000
WORKDIR /data
VOLUME ["/data"]
ENTRYPOINT ["openkd-entrypoint"]
CMD ["--help"]
