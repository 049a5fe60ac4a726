"""Vigil auditor service."""
