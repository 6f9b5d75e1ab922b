"""Model architecture only: no I/O, no MLflow, no Prefect. Imports nothing from the rest of `wudao`."""

from wudao.model.transformer import TransformerConfig, TransformerLM

__all__ = ["TransformerConfig", "TransformerLM"]
