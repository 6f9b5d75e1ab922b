"""Model architecture only: no I/O, no MLflow, no Prefect. Imports nothing from the rest of `wudao`.

Names are imported on first use, so `wudao.model.config` (the torch-free shape the settings tree reads) does not
pull in torch.
"""

from importlib import import_module

_WHERE = {
    "KVCache": "attention",
    "ClozeScore": "cloze",
    "cloze_scores": "cloze",
    "rerank": "cloze",
    "Sampling": "generation",
    "continue_text": "generation",
    "fill_blank": "generation",
    "sample_image_codes": "generation",
    "GLMAux": "glm",
    "GLMLoss": "glm",
    "GLMModel": "glm",
    "GLMOutput": "glm",
    "GLMConfig": "config",
    "GLMShape": "config",
    "GLMObjective": "objective",
    "MoE": "moe",
    "MoEStats": "moe",
    "VQVAE": "vq",
    "VQConfig": "vq",
    "VQOutput": "vq",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'wudao.model' has no attribute {name!r}")
    return getattr(import_module(f"wudao.model.{_WHERE[name]}"), name)
