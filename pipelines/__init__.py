"""Kubeflow pipelines composed from components/."""
