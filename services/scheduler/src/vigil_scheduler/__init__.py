"""Vigil scheduler service."""
