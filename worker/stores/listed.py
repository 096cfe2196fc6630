"""What the remote sources share: one listing of names and sizes answers list, exists and size."""

from __future__ import annotations

from worker.engine.errors import CheckpointError
from worker.engine.storage import check_relative


class ListedSource:
    """A remote source that lists its files once (name -> size) and answers from that listing."""

    description: str

    def sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def list(self) -> list[str]:
        return sorted(self.sizes())

    def exists(self, name: str) -> bool:
        return check_relative(name, self.description) in self.sizes()

    def size(self, name: str) -> int:
        size = self.sizes().get(check_relative(name, self.description))
        if size is None:
            raise CheckpointError(f"{self.description}: {name} does not exist")
        return size
