"""Package layout only; the metadata is in pyproject.toml.

Every directory under ``dsv4_compile/`` is a package of the wheel (found, not listed: a new subpackage
cannot be left out, even one that lacks an ``__init__.py``), and the top-level ``lowerings/`` tree
installs as ``dsv4_compile.lowerings`` (``[tool.setuptools]`` in pyproject.toml can either find
packages or map a directory to a package name, not both).
"""

from setuptools import find_namespace_packages, setup

EXCLUDE = ["*__pycache__*"]
packages = find_namespace_packages(include=["dsv4_compile", "dsv4_compile.*"], exclude=EXCLUDE)
packages += ["dsv4_compile." + p for p in find_namespace_packages(include=["lowerings", "lowerings.*"], exclude=EXCLUDE)]

setup(packages=packages, package_dir={"dsv4_compile.lowerings": "lowerings"})
