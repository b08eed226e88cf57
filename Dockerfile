# mergeserve server image. Docker cannot run on the development machines, so this file was checked
# by reading only; it is deliberately plain. Build: docker build -t mergeserve .
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 MERGESERVE_DATA=/data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY merge ./merge
COPY training ./training
COPY serving ./serving
COPY mergeserve ./mergeserve
COPY deploy ./deploy
# The offline backbone's weights ship inside the package (training/assets), so nothing pretrains here
# or at start-up.
RUN pip install .
# 8000: Serve's HAProxy (every replica); 8001: the model replica's own port (direct ingress, no proxy hop)
EXPOSE 8000 8001 8080
CMD ["mergeserve", "serve", "--host", "0.0.0.0", "--port", "8000", "--direct-port", "8001", "--metrics-export-port", "8080"]
