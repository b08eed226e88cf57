# mergeserve server image. Docker cannot run on the development machines; this file is kept simple and
# is exercised only by reading it. Build: docker build -t mergeserve .
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY merge ./merge
COPY mergeserve ./mergeserve
RUN pip install .
EXPOSE 8000
CMD ["mergeserve", "demo"]
