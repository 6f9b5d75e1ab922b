"""WuDao: workflow-orchestrated lifelong learning of a bilingual, multimodal GLM + MoE model."""

__version__ = "0.1.0"
