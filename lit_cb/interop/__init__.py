"""Conversion between lit_cb model folders and other published quantization formats (AQLM)."""
