-- One database per owner: MLflow and Prefect each manage their own migration history.
CREATE DATABASE catalog;
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
