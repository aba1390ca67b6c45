"""The train loader both data modules serve: a ``DataLoader`` that resumes mid-epoch."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["ResumableDataLoader"]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose place in the epoch is kept in checkpoints (Lightning's stateful loader).

    ``state_dict()`` holds the shuffle generator's state at the start of the current epoch and the
    number of batches served since; after ``load_state_dict`` the next epoch draws the same order
    and skips the batches already trained on, so a resumed fit sees the batches an uninterrupted
    one would. The order is the plain ``DataLoader``'s (same generator, same draws).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_state: Tensor | None = None
        self._served = 0
        self._skip = 0

    def __iter__(self):  # type: ignore[override]
        generator = self.generator
        if self._skip and self._skip >= len(self):
            # Saved after the epoch's last batch: make that epoch's draws (the iterator's seed, then
            # the sampler run to its end), then start the next epoch.
            super().__iter__()
            for _ in self.batch_sampler:
                pass
            self._skip = 0
        skip, self._skip = self._skip, 0
        self._epoch_state = generator.get_state() if generator is not None else None
        self._served = skip
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        return _Counted(iterator, self)

    def state_dict(self) -> dict[str, Any]:
        """The epoch's generator state and the batches served since its start."""
        return {"generator": self._epoch_state, "batches": int(self._served)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved epoch at the next ``iter()``."""
        state = state_dict.get("generator")
        if state is not None and self.generator is not None:
            self.generator.set_state(state)
        self._skip = int(state_dict.get("batches", 0))

    def rewind_to(self, batches: int) -> None:
        """Count only ``batches`` as served (a step cut short by an interrupt is not trained on)."""
        self._served = min(self._served, int(batches))


class _Counted:
    """An iterator that counts the batches its loader served."""

    def __init__(self, iterator: Any, owner: ResumableDataLoader) -> None:
        self._iterator, self._owner = iterator, owner

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        batch = next(self._iterator)
        self._owner._served += 1
        return batch

    def __len__(self) -> int:
        return len(self._iterator)
