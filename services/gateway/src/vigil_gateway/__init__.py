"""Vigil gateway service."""
