"""Integrations with other libraries. Each submodule imports its library lazily, so importing
moe (or this package) never imports them; e.g. ``moe.integrations.hf`` for Hugging Face
transformers' experts implementations.
"""
