"""A multi-step task: count words in parallel, then add up and report, one step after another.

    packmule worker --import multi_step     # with examples/ on PYTHONPATH
    python examples/multi_step.py           # prints the task's id, its progress, its report

Tasks call plain module-level functions; workers run only those of the
modules they were started with (``--import``), as for runners.
"""

from __future__ import annotations

import time

from packmule import MultiStepTask

POEMS = [
    "the mule carries the pack up the hill",
    "many small jobs and one patient mule",
    "beanstalk memcache etcd",
]


def count_words(text: str) -> int:
    """A parallel job."""
    return len(text.split())


def add_up(counts: list[int]) -> int:
    """The first finalization step: it receives every parallel job's value, in order."""
    return sum(counts)


def report(total: int, title: str) -> str:
    """The second step: it receives the first step's value."""
    return f"{title}: {total} words"


def main() -> str:
    """Create the task, watch it, return its value."""
    with MultiStepTask.create("word-count") as task:
        for poem in POEMS:
            task.add_job(count_words, poem)
        task.add_finalization_job(add_up)
        task.add_finalization_job(report, "poems")
    print(f"task {task.id}")  # MultiStepTask.find(task.id) reaches it from any process
    while not (progress := task.progress()).finished:
        print(progress)
        time.sleep(0.2)
    return str(task.get_return_value())


if __name__ == "__main__":
    import multi_step  # the functions under their module's name: workers cannot import __main__

    print(multi_step.main())
