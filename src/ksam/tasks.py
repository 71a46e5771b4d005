"""What a task of your own may use from ksam (``ksam compare --task FILE:FUNCTION``):
:class:`TaskData`, :class:`RandomCropFlip` and :func:`register_task`.

These belong to the experiment harness (:mod:`ksam.lab.tasks`, where every task lives);
this module gives them under a short name. Importing it imports the harness, which
``import ksam`` alone never does.
"""

from .lab.tasks import RandomCropFlip, TaskData, get_task, register_task

__all__ = ["TaskData", "RandomCropFlip", "get_task", "register_task"]
