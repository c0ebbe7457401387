"""Capture time written into a frame's pixels, and read back after decoding.

Glass-to-glass latency has to be measured from what the viewer *decodes*, not from
server clocks, so each published frame carries its capture time (ms since the epoch,
lowest 40 bits) and a CRC-8 as 48 black/white cells in a band across the top of the
picture: 2 rows of 24 square cells, each ``width // 24`` pixels wide (rounded down to a
multiple of 16, the codecs' block size), so at 320x240 cells are 13 px and at 720p
53 px. Black and white blocks that large survive any sane encoder at any bitrate, and
the CRC turns the rare misread into "unreadable" instead of a wrong latency.

Only the luma plane is touched: the band's chroma is left as the background's, which
does not move luma far enough to flip a cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TIME_BITS = 40
CRC_BITS = 8
COLUMNS = 24
ROWS = (TIME_BITS + CRC_BITS) // COLUMNS
TIME_MASK = (1 << TIME_BITS) - 1
BLACK, WHITE = 16, 235  # limited-range luma


def crc8(value: int) -> int:
    """CRC-8 (polynomial 0x07) of the stamp's five bytes."""
    crc = 0
    for byte in value.to_bytes(TIME_BITS // 8, "big"):
        crc ^= byte
        for _ in range(8):
            crc = (crc << 1 ^ 0x07) & 0xFF if crc & 0x80 else crc << 1 & 0xFF
    return crc


@dataclass(frozen=True)
class StampLayout:
    """Where the cells lie in a ``width`` x ``height`` luma plane."""

    width: int
    height: int

    @property
    def cell(self) -> int:
        cell = self.width // COLUMNS
        return cell - cell % 16 if cell >= 32 else cell - cell % 2

    @property
    def band_height(self) -> int:
        return self.cell * ROWS

    def __post_init__(self) -> None:
        if self.cell < 8 or self.band_height > self.height // 2:
            raise ValueError(f"{self.width}x{self.height} is too small for a readable stamp")

    def paint(self, luma: np.ndarray, ms: int) -> None:
        """Write ``ms`` (its lowest 40 bits) and its CRC into the band of ``luma``."""
        value = ms & TIME_MASK
        bits = value << CRC_BITS | crc8(value)
        cell = self.cell
        for i in range(TIME_BITS + CRC_BITS):
            row, column = divmod(i, COLUMNS)
            on = bits >> (TIME_BITS + CRC_BITS - 1 - i) & 1
            luma[row * cell : (row + 1) * cell, column * cell : (column + 1) * cell] = (
                WHITE if on else BLACK
            )

    def read(self, luma: np.ndarray) -> int | None:
        """The 40-bit stamp in ``luma``, or ``None`` when the CRC does not match.

        Each cell is judged by the mean of its inner half, away from the block edges
        where compression smears black into white."""
        cell, q = self.cell, self.cell // 4
        band = luma[: self.band_height, : cell * COLUMNS].astype(np.uint16)
        bits = 0
        for i in range(TIME_BITS + CRC_BITS):
            row, column = divmod(i, COLUMNS)
            y, x = row * cell, column * cell
            inner = band[y + q : y + cell - q, x + q : x + cell - q]
            bits = bits << 1 | int(inner.mean() > (BLACK + WHITE) / 2)
        value, crc = bits >> CRC_BITS, bits & 0xFF
        return value if crc8(value) == crc else None


def age_ms(stamp: int, now_ms: int) -> int:
    """Milliseconds from the time whose lowest 40 bits are ``stamp`` to ``now_ms``
    (a 40-bit ms clock wraps every 35 years; a small negative age stays negative)."""
    age = (now_ms - stamp) & TIME_MASK
    return age - (1 << TIME_BITS) if age >= 1 << (TIME_BITS - 1) else age
