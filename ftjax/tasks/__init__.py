"""Built-in tasks, registered by name (``config.task``)."""

from ftjax.tasks import classification  # noqa: F401
from ftjax.tasks import language_modeling  # noqa: F401
from ftjax.tasks import token_classification  # noqa: F401
from ftjax.tasks import question_answering  # noqa: F401
from ftjax.tasks import seq2seq  # noqa: F401
from ftjax.tasks.base import Task, get_task, register

__all__ = ["Task", "get_task", "register"]
