"""Fuzz targets of every parser, shared by the hypothesis tests and the atheris harnesses."""
