"""Typer command-line interface: a thin root (``main``) plus one module per command group.

Command modules import only typer/rich/pydantic at module level; torch, transformers and the
other heavy libraries are imported inside command bodies so ``doge --help`` stays fast.
"""
