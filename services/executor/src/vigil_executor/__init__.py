"""Vigil executor service."""
