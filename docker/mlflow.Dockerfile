# MLflow tracking server with the PostgreSQL driver and boto3 for artefacts proxied to S3.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1
RUN pip install "mlflow>=3.17,<3.18" "psycopg[binary]>=3.1" "boto3>=1.34" && useradd --create-home --uid 1000 mlflow
USER mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
