"""Progress bars in bytes, for reads and writes of checkpoints."""

from __future__ import annotations


class ByteBar:
    """A tqdm bar in bytes that appears only once there is something to count (no empty bar before
    a run that fails early); with ``enabled`` False, a no-op."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def reset(self, total: int) -> None:
        if self.enabled and self.bar is None:
            self.bar = _bar(self.desc, True, total)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.enabled = False


def _bar(desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, leave=False)
