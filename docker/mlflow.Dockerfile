# MLflow tracking server: the basic-auth app (mlflow[auth]), the PostgreSQL driver and boto3 for artefacts proxied to
# S3. Only the server's packages, not the platform (no torch here); the version bounds are pyproject.toml's.
FROM python:3.11.13-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN pip install "mlflow[auth]>=3.17,<3.18" "psycopg[binary]>=3.1,<4" "boto3>=1.34,<2" \
    && useradd --create-home --uid 1000 mlflow
# The auth app's config holds no secret (infra/mlflow-auth.ini); passwords come from the environment.
COPY infra/mlflow-auth.ini /etc/mlflow/basic_auth.ini
ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini
USER 1000
EXPOSE 5000
CMD ["mlflow", "server", "--app-name", "basic-auth", "--host", "0.0.0.0", "--port", "5000"]
