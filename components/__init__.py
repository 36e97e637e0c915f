"""Kubeflow pipeline components and the MLOps glue (tracking, registry, local stack): thin wrappers around the core."""
