# The API server (REST + gRPC). It never imports torch, so the image installs only the `service`
# extra: no torch, no DeepSpeed, a few hundred MB instead of several GB.
#   docker build -f docker/api.Dockerfile -t rlhf-api .
# Bases pinned to exact releases; `make lint` runs hadolint on this file (docker/hadolint.yaml).
# The web console (/ui/): built from the pinned npm packages in a Node stage; only its static files are kept.
FROM node:20.20.2-bookworm-slim AS console
WORKDIR /console
COPY service/console/package.json service/console/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY service/console/index.html service/console/vite.config.js ./
COPY service/console/src ./src
RUN npm run build

FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RLHF_CACHE_DIR=/data/cache RLHF_CONSOLE_DIR=/app/service/console/dist
# bubblewrap: the sandbox python graders run in (rlhf_engine/sandbox.py)
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY rlhf_engine ./rlhf_engine
COPY service ./service
COPY --from=console /console/dist ./service/console/dist
COPY workers ./workers
COPY proto ./proto
# the gRPC code is generated from proto/ before the package is installed (it is never committed)
RUN pip install --no-cache-dir -c constraints.txt grpcio-tools && python service/grpc/build.py \
    && pip install --no-cache-dir -c constraints.txt '.[service]' \
    && useradd --create-home --uid 10001 rlhf && mkdir -p /data && chown 10001 /data
# no secret is baked in: DATABASE_URL, REDIS_URL, RLHF_INFERENCE_TOKEN come from the environment at run time
USER 10001
VOLUME ["/data"]
EXPOSE 8000 50051
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 CMD ["rlhf", "health", "api"]
# Migrates the database (under a lock) on start; `rlhf keys create --tenant T` makes API keys.
CMD ["rlhf", "serve", "--host", "0.0.0.0", "--port", "8000"]
