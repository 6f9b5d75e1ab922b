"""Prefect 3 flows: thin orchestration over `wudao.stages` (no logic of their own)."""
