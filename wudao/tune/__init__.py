"""Adapting a trained model to a task (`wudao tune`): task folders (task.py), the recipe -- P-tuning v2/v1 of the
frozen GLM or full fine-tuning (recipe.py), adapters in the store and applied to a base (adapter.py), and the run
that stores, logs and registers them (run.py). The prompt encoders themselves are architecture: wudao/model/prompts.py.
"""
