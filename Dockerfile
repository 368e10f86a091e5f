# syntax=docker/dockerfile:1
# mab-service image: the wheel (with the C++ kernel) is compiled in the build stage; the runtime stage has no
# compiler, no wheels and no pip cache, and runs one worker as a non-root user. docs/operations.md has more.
#
#   docker build -t mab-service:0.1.0 .
#   docker run --rm -p 8000:8000 mab-service:0.1.0
#   docker run --rm -p 8000:8000 -e MAB_WORKERS=4 -e MAB_FEATURES=csv:/data/table.csv -v "$PWD/data:/data:ro" mab-service:0.1.0

# --- build: dependency wheels first (cached until pyproject.toml changes), then the project's wheel ------------
FROM python:3.11.11-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
# The extras the image serves with: Vertex sources, and the fleet (bigtable:, --events pubsub:, `learn`, `setup`).
ARG EXTRAS="vertex fleet"
RUN python -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print(*p['dependencies'], *(r for e in sys.argv[1:] for r in p['optional-dependencies'][e]), sep='\n')" $EXTRAS \
        > requirements.txt \
    && pip wheel --wheel-dir /wheels/deps --requirement requirements.txt
COPY setup.py README.md ./
COPY csrc ./csrc
COPY mab_service ./mab_service
# Portable flags (-O3, no -march): the kernel picks SSE2, AVX2 or AVX-512 at run time.
RUN pip wheel --no-deps --wheel-dir /wheels/app .

# --- runtime: the slim image, the wheels installed from a bind mount so they never become a layer -------------
FROM python:3.11.11-slim-bookworm AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 mab \
    && useradd --system --uid 10001 --gid mab --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mab
RUN --mount=type=bind,from=build,source=/wheels/deps,target=/wheels/deps \
    pip install --no-index --find-links=/wheels/deps /wheels/deps/*.whl
RUN --mount=type=bind,from=build,source=/wheels/app,target=/wheels/app \
    pip install --no-index --no-deps /wheels/app/*.whl
# Settings come from MAB_* variables (or flags after `serve`); MAB_WORKERS=N runs N workers on one port, sharing one
# bandit (deploy/base sets it); the fleet's replicas run one worker each (deploy/fleet).
ENV MAB_HOST=0.0.0.0 MAB_PORT=8000 MAB_WORKERS=1 MAB_STATE_DIR=/var/lib/mab-service
# The learning loop's journal, checkpoint and decision log (docs/learning.md): mount a volume here to keep them.
RUN mkdir -p /var/lib/mab-service && chown 10001:10001 /var/lib/mab-service
VOLUME ["/var/lib/mab-service"]
# Numeric, so that Kubernetes can check runAsNonRoot without reading the image.
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 CMD ["mab-service", "health"]
ENTRYPOINT ["mab-service"]
CMD ["serve"]
