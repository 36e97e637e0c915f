"""The MLOps glue around the core: S3 (one client, one object store, one publish/verify helper), MLflow
(live and after-the-fact logging, the registry), published data and backbones, the storage roles."""
