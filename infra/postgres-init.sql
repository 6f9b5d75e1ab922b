-- One database per owner: MLflow, MLflow's auth users and Prefect each manage their own migration history.
CREATE DATABASE catalog;
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
