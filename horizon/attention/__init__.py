"""Attention: the one entry point (attend.py), Selections and policies, RoPE."""
