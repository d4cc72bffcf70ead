"""Celery configuration shared by the API (which only sends tasks) and the worker.

Long GPU jobs need: late acks with rejection on worker loss (a killed worker's job is redelivered, not lost), a
prefetch of one (a worker holds only the job it runs), a Redis visibility timeout above the longest job for the
broker and the result backend alike (otherwise Redis redelivers a running job to a second worker), a hard time
limit, and a dedicated queue. Results are not stored: the database is the source of truth.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from jobs.settings import Settings

RUN_JOB_TASK = "lorashear.run_job"
"""Name the task is sent by; the API never imports the worker's code."""


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for ``settings`` (broker, queue, long-job behaviour)."""
    transport = {"visibility_timeout": settings.visibility_timeout}
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.broker_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 1,  # a fresh process per job: no leaked accelerator memory between jobs
        "worker_concurrency": 1,  # one job per worker; one worker per GPU
        "worker_hijack_root_logger": False,
        "task_time_limit": settings.job_time_limit,
        "task_soft_time_limit": max(1, settings.job_time_limit - 60),
        "task_default_queue": settings.celery_queue,
        "task_queues": (Queue(settings.celery_queue),),
        "task_routes": {RUN_JOB_TASK: {"queue": settings.celery_queue}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_send_task_events": False,
    }


def make_celery(settings: Settings, main: str = "lorashear") -> Celery:
    """A Celery app configured from ``settings``."""
    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app
