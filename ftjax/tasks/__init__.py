"""Built-in tasks, registered by name (``config.task``)."""

from ftjax.tasks import classification  # noqa: F401
from ftjax.tasks.base import Task, get_task, register

__all__ = ["Task", "get_task", "register"]
