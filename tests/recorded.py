"""A recorded source: the Source interface over fixed raw counts (pure tests only)."""


class RecordedSource:
    def __init__(self, raws, health=None, fail=False):
        self.raws = list(raws)
        self._health = health or {"counts_dropped": 0, "events_lost": 0, "calls_dropped": 0}
        self.fail = fail
        self.deleted = []
        self.latency = ([], [0, 0])

    def read_counts(self):
        if self.fail:
            raise OSError(9, "Bad file descriptor")
        return list(self.raws)

    def delete_counts(self, raws):
        self.deleted.extend(raws)
        self.raws = [r for r in self.raws if r not in raws]

    def health(self):
        return dict(self._health)

    def read_latency(self):
        return self.latency
