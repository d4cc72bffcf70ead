"""The Celery worker of the job service: ``celery -A worker.celery_app worker``.

The worker's parent process never imports torch (no CUDA before the pool forks); the task body imports the
pipeline inside the pool process that runs the job.
"""
