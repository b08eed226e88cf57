# mergeserve server image. Docker cannot run on the development machines, so this file was checked by
# reading and by tests/deploy/test_deploy_files.py (base, wget, constraints), not by a build.
# Build: docker build -t mergeserve .
#
# python:3.11-slim (the Python the constraints were resolved with) plus wget: KubeRay's readiness and
# liveness probes run `wget ... http://localhost:<port>/... | grep success` inside the Ray container.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 MERGESERVE_DATA=/data
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY merge ./merge
COPY training ./training
COPY serving ./serving
COPY mergeserve ./mergeserve
COPY deploy ./deploy
# The offline backbone's weights ship inside the package (training/assets), so nothing pretrains here
# or at start-up. deploy/constraints.txt pins every distribution (ray == rayVersion of rayservice.yaml):
# two builds install the same versions.
RUN pip install -c deploy/constraints.txt .
# 8000: Serve's HAProxy (every replica); 8001: the model replica's own port (direct ingress, no proxy hop)
EXPOSE 8000 8001 8080
CMD ["mergeserve", "serve", "--host", "0.0.0.0", "--port", "8000", "--direct-port", "8001", "--metrics-export-port", "8080"]
