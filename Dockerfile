# openkd for CUDA GPU nodes.
# The official vLLM image pins CUDA, PyTorch and vLLM together (0.32, the vLLM version openkd's CPU CI
# runs); openkd adds TRL, DeepSpeed and distilabel on top without replacing them.
# Build: docker build -t openkd .
# Run:   docker run --gpus all --ipc=host -e HF_TOKEN -v "$PWD/data:/data" openkd generate --help
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf-cache \
    OPENKD_HOME=/opt/openkd

WORKDIR /opt/openkd
# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
COPY scripts/docker-install.sh scripts/docker-install.sh
RUN bash scripts/docker-install.sh deps

COPY configs ./configs
COPY openkd ./openkd
RUN bash scripts/docker-install.sh app \
    && useradd --create-home --uid 1000 --shell /bin/bash openkd \
    && mkdir -p /data \
    && chown openkd:openkd /data

USER 1000:1000
WORKDIR /data
VOLUME ["/data"]
ENTRYPOINT ["openkd"]
CMD ["--help"]
