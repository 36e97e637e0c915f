"""The local development stack (moto S3 with per-role keys, MLflow) and its `fedmedclip stack` commands: for
this machine, tests and demos only; the Docker images do not ship it."""
