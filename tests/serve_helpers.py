"""A job listener for the serving engine's tests: keeps each job's outcome and the order jobs ended in."""

from __future__ import annotations


class Recorder:
    """`results[id(job)]` = the job's JobResult or RequestError; `order` = job ids as they ended.
    `on_prepared()` runs when a job's prompt is ready (its decode about to start)."""

    def __init__(self, on_prepared=None):
        self.results, self.order, self.on_prepared = {}, [], on_prepared

    def prepared(self, job, error):
        assert error is None, error
        if self.on_prepared is not None:
            self.on_prepared()

    def text(self, job, delta):
        pass

    def audio(self, job, wave):
        pass

    def done(self, job, outcome):
        self.results[id(job)] = outcome
        self.order.append(id(job))
