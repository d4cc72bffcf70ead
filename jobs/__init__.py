"""The job-service domain shared by the HTTP API and the worker.

Settings, ORM models, job states, the repository (all SQL), the service layer the routes call, the dispatchers
that wake workers, and the task body :func:`jobs.runner.run_job` that both the Celery task and the embedded worker
thread run. Importing this package never imports torch or ``lorashear.pipeline``; the task body imports the
pipeline when it first runs a job.
"""
